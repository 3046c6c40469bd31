// Drive the browser demo (examples/web, served by serve.py) in headless Chromium like a user and save its results.
// Usage: node browser.mjs OUT.json TIMEOUT_S URL [URL...]
//   Each URL is opened in a fresh page; unless it has autorun=1, the Generate button is clicked once the page is
//   ready. OUT.json gets one entry per URL: window.tinymusician.result (audio as a plain array) plus the
//   Download WAV link's bytes. Exit 1 on any page error, failed generation or timeout (the browser log is
//   printed then; BROWSER_LOG=1 prints it always).
// Chromium: /usr/bin/chromium (apt-get install -y chromium) or $CHROMIUM; playwright-core never downloads one.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const [out, timeoutSeconds, ...urls] = process.argv.slice(2);
if (!out || !urls.length) {
  console.error('usage: node browser.mjs OUT.json TIMEOUT_S URL [URL...]');
  process.exit(2);
}
const timeout = Number(timeoutSeconds) * 1000;
const userDataDir = mkdtempSync(path.join(os.tmpdir(), 'tinymusician-chromium-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});

const problems = [];
const results = [];
try {
  for (const url of urls) {
    const page = await context.newPage();
    const failuresBefore = problems.length;
    const log = [];
    page.on('console', (msg) => log.push(`console.${msg.type()}: ${msg.text()}`));
    page.on('pageerror', (err) => problems.push(`page error at ${url}: ${err.stack || err.message}`));
    page.on('requestfailed', (req) => log.push(`request failed: ${req.url()} ${req.failure()?.errorText}`));
    page.on('response', (res) => res.status() >= 400 && log.push(`HTTP ${res.status()}: ${res.url()}`));
    try {
      await page.goto(url);
      if (!new URL(url).searchParams.has('autorun')) {
        await page.waitForFunction(() => ['ready', 'error'].includes(window.tinymusician?.status), null, {
          timeout,
        });
        await page.click('#generate', { timeout });
      }
      await page.waitForFunction(() => ['done', 'error'].includes(window.tinymusician?.status), null, { timeout });
      const state = await page.evaluate(async () => {
        const { status, error, result } = window.tinymusician;
        if (status !== 'done') return { status, error };
        const link = document.querySelector('#download');
        const wav = new Uint8Array(await (await fetch(link.href)).arrayBuffer());
        const player = document.querySelector('#player'); // the WAV decodes: its duration (NaN after 30 s)
        const loaded = new Promise((resolve) => {
          if (player.readyState >= 1) resolve();
          else player.addEventListener('loadedmetadata', () => resolve(), { once: true });
        });
        await Promise.race([loaded, new Promise((resolve) => setTimeout(resolve, 30000))]);
        const { audio, ...rest } = result;
        return {
          status,
          result: {
            ...rest,
            audio: Array.from(audio),
            download: { href: link.href, filename: link.download, bytes: Array.from(wav) },
            player_src: player.src,
            player_duration: player.readyState >= 1 ? player.duration : null,
            status_text: document.querySelector('#status').textContent,
            rtf_text: document.querySelector('#rtf').textContent,
          },
        };
      });
      if (state.status !== 'done') problems.push(`generation failed at ${url}: ${state.error}`);
      else results.push({ url, ...state.result });
    } catch (err) {
      problems.push(`${url}: ${err.message}`);
    }
    const failed = problems.length > failuresBefore;
    if (failed || process.env.BROWSER_LOG) {
      console.error(`--- browser log for ${url}\n${log.join('\n')}`);
    }
    if (!failed) {
      console.log(`${url}: RTF ${results.at(-1).rtf.toFixed(3)}`);
    }
    await page.close();
  }
} finally {
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
writeFileSync(out, JSON.stringify(results));
if (problems.length) {
  console.error(problems.join('\n'));
  process.exit(1);
}
