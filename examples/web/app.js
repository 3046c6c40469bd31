// TinyMusician browser demo: the form, the WAV and the result; worker.js runs transformers.js.
// URL parameters prefill the form: prompt, seconds, dtype (fp32|q8|q4), guidance, greedy=1, threads,
// model (a bundle under /models/), autorun=1 (generate once the model facts are read).
// The last result is window.tinymusician.result (codes, input_ids, audio, rtf, wav_bytes, ...), for tests.

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = { status: 'loading', result: null, error: null, runs: 0 };
window.tinymusician = state;

function showStatus(text, isError = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', isError);
}

function fail(message, retry = true) {
  state.status = 'error';
  state.error = message;
  showStatus(message, true);
  $('generate').disabled = !retry;
}

async function fetchJson(url, optional = false) {
  const response = await fetch(url);
  if (response.ok) return response.json();
  if (optional && response.status === 404) return null;
  throw new Error(`${url}: HTTP ${response.status} (is examples/web/serve.py serving this page?)`);
}

// 16-bit PCM mono WAV: 44-byte header + 2 bytes per sample (clipped to [-1, 1]).
export function encodeWav(samples, samplingRate) {
  const view = new DataView(new ArrayBuffer(44 + 2 * samples.length));
  const text = (offset, s) => [...s].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  text(0, 'RIFF');
  view.setUint32(4, 36 + 2 * samples.length, true);
  text(8, 'WAVE');
  text(12, 'fmt ');
  view.setUint32(16, 16, true); // fmt chunk size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, samplingRate, true);
  view.setUint32(28, 2 * samplingRate, true); // bytes per second
  view.setUint16(32, 2, true); // block align
  view.setUint16(34, 16, true); // bits per sample
  text(36, 'data');
  view.setUint32(40, 2 * samples.length, true);
  for (let i = 0; i < samples.length; i++) {
    view.setInt16(44 + 2 * i, Math.round(Math.max(-1, Math.min(1, samples[i])) * 32767), true);
  }
  return new Blob([view.buffer], { type: 'audio/wav' });
}

// The bundle's facts: config.json (codec, codebooks), generation_config.json (default guidance),
// manifest.json (TinyMusician's frame limits and precisions; optional for other transformers.js bundles).
async function readBundle() {
  const server = await fetchJson('/config.json');
  const model = params.get('model') ?? server.model;
  const base = `${server.modelPath}${model}/`;
  const [config, generation, manifest] = await Promise.all([
    fetchJson(`${base}config.json`),
    fetchJson(`${base}generation_config.json`, true),
    fetchJson(`${base}manifest.json`, true),
  ]);
  const codec = config.audio_encoder;
  const hop = codec.upsampling_ratios.reduce((a, b) => a * b, 1);
  const K = config.decoder.num_codebooks;
  const facts = manifest?.model ?? {};
  return {
    model,
    modelPath: server.modelPath,
    K,
    samplingRate: codec.sampling_rate,
    hop,
    frameRate: facts.frame_rate ?? codec.sampling_rate / hop,
    minFrames: facts.min_frames ?? 7,
    maxFrames: facts.max_frames ?? config.decoder.max_position_embeddings - K + 1,
    guidance: generation?.guidance_scale ?? 1,
    precisions: manifest?.precisions ?? ['fp32', 'int8', 'int4'],
    source: manifest?.source,
  };
}

const bundle = await readBundle().catch((err) => fail(String(err.message ?? err), false));
const PRECISION = { fp32: 'fp32', q8: 'int8', q4: 'int4' };
const isolated = globalThis.crossOriginIsolated === true; // serve.py's COOP/COEP headers: threads allowed
const threads = Number(params.get('threads') ?? (isolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1));
const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
let job = null;

function setUpForm() {
  $('model').textContent = bundle.source ? `${bundle.model} (${bundle.source})` : bundle.model;
  for (const option of $('dtype').options) option.disabled = !bundle.precisions.includes(PRECISION[option.value]);
  $('guidance').value = bundle.guidance;
  $('limits').textContent =
    `${bundle.minFrames / bundle.frameRate}–${(bundle.maxFrames / bundle.frameRate).toFixed(1)} s ` +
    `at ${bundle.samplingRate} Hz · guidance ${bundle.guidance} is the bundle's default (1: one pass) · ` +
    `${threads} WASM thread(s)`;
  for (const name of ['prompt', 'seconds', 'dtype', 'guidance']) {
    if (params.has(name)) $(name).value = params.get(name);
  }
  if (params.has('greedy')) $('greedy').checked = params.get('greedy') === '1';
  if ($('dtype').selectedOptions[0]?.disabled) $('dtype').value = 'fp32';
}

function readForm() {
  const prompt = $('prompt').value.trim();
  if (!prompt) throw new Error('Describe the music to generate (the prompt is empty).');
  const seconds = Number($('seconds').value);
  const frames = Math.round(seconds * bundle.frameRate);
  if (!(frames >= bundle.minFrames && frames <= bundle.maxFrames)) {
    throw new Error(
      `${seconds} s is ${frames} codec frames; this model generates ${bundle.minFrames}..${bundle.maxFrames} ` +
        `(${(bundle.minFrames / bundle.frameRate).toFixed(2)}..${(bundle.maxFrames / bundle.frameRate).toFixed(1)} s).`,
    );
  }
  const guidance = Number($('guidance').value);
  if (!Number.isFinite(guidance) || guidance < 0) throw new Error('The guidance scale must be a number >= 0.');
  return {
    prompt,
    seconds,
    frames,
    max_new_tokens: frames + bundle.K - 1, // the delay pattern: K - 1 steps more than frames
    dtype: $('dtype').value,
    guidance,
    greedy: $('greedy').checked,
  };
}

$('form').addEventListener('submit', (event) => {
  event.preventDefault();
  if (job !== null) return;
  try {
    job = readForm();
  } catch (err) {
    fail(err.message);
    return;
  }
  state.status = 'running';
  state.error = null;
  $('generate').disabled = true;
  worker.postMessage({
    type: 'generate',
    ...job,
    model: bundle.model,
    modelPath: bundle.modelPath,
    threads,
    // The locally served onnxruntime-web. The plain build, not transformers.js's default asyncify one (which
    // WebGPU needs): on the CPU it ran the tiny bundle 1.6-3.5x faster in headless Chromium.
    wasmPaths: {
      mjs: new URL('/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.mjs', location.href).href,
      wasm: new URL('/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm', location.href).href,
    },
  });
});

let wavUrl = null;

function showResult(message) {
  const audio = message.audio;
  const audio_s = audio.length / bundle.samplingRate;
  const rtf = message.compute_s / audio_s;
  const wav = encodeWav(audio, bundle.samplingRate);
  if (wavUrl) URL.revokeObjectURL(wavUrl);
  wavUrl = URL.createObjectURL(wav);
  $('player').src = wavUrl;
  $('download').href = wavUrl;
  $('download').download = `tinymusician-${job.prompt.replace(/[^a-z0-9]+/gi, '-').slice(0, 40)}.wav`;
  $('rtf').textContent =
    `${audio_s.toFixed(2)} s of audio in ${message.compute_s.toFixed(2)} s: RTF ${rtf.toFixed(3)} ` +
    `(compute / audio seconds; model load ${message.load_s.toFixed(2)} s)`;
  $('output').hidden = false;
  state.result = {
    ...job,
    codes: message.codes,
    input_ids: message.input_ids,
    audio,
    samples: audio.length,
    sampling_rate: bundle.samplingRate,
    hop: bundle.hop,
    threads,
    compute_s: message.compute_s,
    load_s: message.load_s,
    audio_s,
    rtf,
    wav_bytes: wav.size,
    wav_url: wavUrl,
  };
  state.runs += 1;
  state.status = 'done';
  showStatus(`Done: ${job.prompt}`);
  $('generate').disabled = false;
  job = null;
}

worker.onmessage = ({ data }) => {
  if (data.type === 'status') showStatus(data.text);
  else if (data.type === 'progress') showStatus(`Generating: step ${data.step} of ${data.total}`);
  else if (data.type === 'result') showResult(data);
  else if (data.type === 'error') {
    job = null;
    console.error(data.stack || data.message);
    fail(`Generation failed: ${data.message}`);
  }
};
worker.onerror = (event) => {
  job = null;
  fail(`The worker failed: ${event.message || 'could not load worker.js or transformers.js'}`);
};

if (bundle) {
  setUpForm();
  state.status = 'ready';
  showStatus('Ready.');
  $('generate').disabled = false;
  if (params.get('autorun') === '1') $('form').requestSubmit();
}
