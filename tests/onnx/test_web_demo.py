"""The browser demo (examples/web) in headless Chromium on the exported bundle: serve.py's routes and errors, and
a user's Generate click giving Python's greedy codes (fp32: transformers; q8: ONNX Runtime int8), the audio and
its WAV download."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest

from tests.onnx.test_runtime import JS_DIR, PROMPTS, as_array
from tinymusician.models.generation import torch_generate
from tinymusician.onnx.runtime import TinyMusicianONNX

pytestmark = pytest.mark.usefixtures("single_thread")

WEB_DIR = Path(__file__).parents[2] / "examples" / "web"
SERVE = WEB_DIR / "serve.py"
CHROMIUM = "/usr/bin/chromium"
FRAMES, GUIDANCE = 20, 3.0  # guidance 3 is also the tiny bundle's generation_config default


def assert_same_codes_but_the_tail(codes: np.ndarray, ref_codes: np.ndarray, k: int) -> None:
    """transformers.js does not force the end of the delay pattern to pad (REFERENCES.md): only codes in the
    last K-1 frames may differ, at most (K-2)(K-1)/2 of them per prompt (as in test_runtime's Node test)."""
    assert codes.shape == ref_codes.shape
    frames = codes.shape[-1]
    differ = codes != ref_codes
    assert not differ[:, :, : frames - (k - 1)].any()
    assert differ.sum(axis=(1, 2)).max() <= (k - 2) * (k - 1) // 2


def start_server(bundle: Path, node_modules: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """serve.py on a free port (it prints the URL first); its stderr goes to ``log``."""
    command = [sys.executable, str(SERVE), str(bundle), "--port", "0", "--quiet"]
    with log.open("w") as stderr:
        server = subprocess.Popen(
            [*command, "--node-modules", str(node_modules)], stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    line = server.stdout.readline()  # "TinyMusician demo (name): http://127.0.0.1:PORT/"
    if "http://" not in line:
        server.kill()
        pytest.fail(f"serve.py did not start: {line}{log.read_text()}")
    return server, line.split()[-1]


@pytest.fixture(scope="module")
def served(bundle, tmp_path_factory) -> Iterator[str]:
    """The demo served on a free port, with tests/js's transformers.js install as its node_modules."""
    if not (JS_DIR / "node_modules" / "@huggingface" / "transformers").is_dir():
        pytest.fail(f"transformers.js is not installed: cd {JS_DIR} && ONNXRUNTIME_NODE_INSTALL=skip npm ci")
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    server, url = start_server(bundle, JS_DIR / "node_modules", log)
    try:
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)
        server.stdout.close()


def page_url(base: str, prompt: str, dtype: str, **extra: str) -> str:
    query = {"prompt": prompt, "seconds": FRAMES / 50, "dtype": dtype, "greedy": 1, "threads": 1, **extra}
    return f"{base}?{urlencode(query)}"


@pytest.fixture(scope="module")
def browser_results(request, tmp_path_factory) -> dict[str, dict]:
    """One Chromium session: fp32 by clicking Generate (guidance left at the page's default, the bundle's),
    then q8 with autorun=1 and guidance in the URL. Results by dtype."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the browser test needs Node.js >= 20")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    if not (JS_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.fail(
            f"playwright-core is not installed: cd {JS_DIR} && "
            "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 ONNXRUNTIME_NODE_INSTALL=skip npm ci"
        )
    served = request.getfixturevalue("served")  # after the skips: no node, no transformers.js install either
    out = tmp_path_factory.mktemp("browser") / "results.json"
    urls = [
        page_url(served, PROMPTS[0], "fp32"),
        page_url(served, PROMPTS[1], "q8", guidance=str(GUIDANCE), autorun="1"),
    ]
    env = {**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"}
    command = ["node", "browser.mjs", str(out), "120", *urls]
    result = subprocess.run(command, cwd=JS_DIR, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    entries = json.loads(out.read_text())
    assert [entry["dtype"] for entry in entries] == ["fp32", "q8"]
    return {entry["dtype"]: entry for entry in entries}


# --- serve.py ----------------------------------------------------------------------------------------------
def test_serve_rejects_a_missing_bundle_or_node_modules(bundle, tmp_path):
    missing = tmp_path / "no-such-bundle"
    result = subprocess.run(
        [sys.executable, str(SERVE), str(missing)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert str(missing) in result.stderr and "python -m tinymusician.export" in result.stderr
    not_a_bundle = subprocess.run(
        [sys.executable, str(SERVE), str(tmp_path)], capture_output=True, text=True, timeout=30
    )
    assert not_a_bundle.returncode == 2 and "not an exported ONNX bundle" in not_a_bundle.stderr
    no_modules = tmp_path / "node_modules"
    result = subprocess.run(
        [sys.executable, str(SERVE), str(bundle), "--node-modules", str(no_modules)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert str(no_modules) in result.stderr and "npm ci" in result.stderr


def fetch(url: str) -> tuple[int, Message, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, b""


def test_serve_routes_the_page_bundle_and_runtime_only(served, bundle):
    status, headers, body = fetch(served)
    assert status == 200 and b"Generate" in body and headers["Content-Type"].startswith("text/html")
    assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"  # cross-origin isolated: WASM threads
    status, _, body = fetch(served + "config.json")
    assert json.loads(body) == {"model": bundle.name, "modelPath": "/models/"}
    types = {
        "app.js": "text/javascript",
        "worker.js": "text/javascript",
        f"models/{bundle.name}/config.json": "application/json",
        f"models/{bundle.name}/onnx/decoder_model_merged_quantized.onnx": "application/octet-stream",
        "node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm": "application/wasm",
        "node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.mjs": "text/javascript",
    }
    for path, mime in types.items():
        status, headers, body = fetch(served + path)
        assert status == 200 and headers["Content-Type"].startswith(mime), path
    assert fetch(served + f"models/{bundle.name}/config.json")[2] == (bundle / "config.json").read_bytes()
    for path in [
        "serve.py",
        "models/",
        f"models/{bundle.name}/",
        "models/other/config.json",
        "node_modules/%2e%2e/serve.py",
    ]:
        assert fetch(served + path)[0] == 404, path


# --- the page in Chromium --------------------------------------------------------------------------------
def test_fp32_page_generates_transformers_greedy_codes(browser_results, bundle, student, tokenizer):
    result = browser_results["fp32"]
    assert result["guidance"] == GUIDANCE  # the form's default: the bundle's generation_config
    k = student.decoder.config.num_codebooks
    ids, _ = TinyMusicianONNX(bundle).encode_prompts(PROMPTS[:1])
    np.testing.assert_array_equal(as_array(result["input_ids"], np.int64), ids)
    ref_audio, ref_codes = torch_generate(
        student, tokenizer, PROMPTS[:1], FRAMES, guidance_scale=GUIDANCE, do_sample=False
    )
    codes = as_array(result["codes"], np.int64)
    assert_same_codes_but_the_tail(codes, ref_codes, k)
    if (codes == ref_codes).all():
        np.testing.assert_allclose(np.asarray(result["audio"]), ref_audio[0], atol=1e-4)


def test_q8_page_generates_onnx_runtime_int8_codes(browser_results, bundle):
    result = browser_results["q8"]
    runtime = TinyMusicianONNX(bundle, precision="int8", threads=1)
    ids, _ = runtime.encode_prompts(PROMPTS[1:])
    np.testing.assert_array_equal(as_array(result["input_ids"], np.int64), ids)
    _, ref_codes = runtime.generate(
        PROMPTS[1:], FRAMES / runtime.frame_rate, guidance_scale=GUIDANCE, do_sample=False, return_codes=True
    )
    assert_same_codes_but_the_tail(
        as_array(result["codes"], np.int64), ref_codes, runtime.facts["num_codebooks"]
    )


@pytest.mark.parametrize("dtype", ["fp32", "q8"])
def test_page_audio_rtf_and_wav_download(browser_results, bundle, dtype):
    result = browser_results[dtype]
    config = json.loads((bundle / "config.json").read_text())
    rate = config["audio_encoder"]["sampling_rate"]
    hop = math.prod(config["audio_encoder"]["upsampling_ratios"])
    assert result["codes"]["dims"] == [1, config["decoder"]["num_codebooks"], FRAMES]
    samples = result["samples"]
    assert samples == len(result["audio"]) == FRAMES * hop
    assert math.isfinite(result["rtf"]) and result["rtf"] > 0
    assert f"RTF {result['rtf']:.3f}" in result["rtf_text"]
    assert np.isfinite(result["audio"]).all()
    # The Download WAV link (also the player's source): 16-bit PCM mono at the bundle's rate.
    download = result["download"]
    assert download["filename"].endswith(".wav") and result["player_src"] == download["href"]
    assert result["player_duration"] == pytest.approx(samples / rate, abs=1e-3)  # Chromium decoded the WAV
    wav = bytes(download["bytes"])
    assert len(wav) == result["wav_bytes"] == 44 + 2 * samples
    # RIFF size, "fmt " chunk (16 bytes: PCM, mono, rate, byte rate, block align, 16 bits), data size
    header = (
        b"RIFF",
        36 + 2 * samples,
        b"WAVE",
        b"fmt ",
        16,
        1,
        1,
        rate,
        2 * rate,
        2,
        16,
        b"data",
        2 * samples,
    )
    assert struct.unpack("<4sI4s4sIHHIIHH4sI", wav[:44]) == header
    pcm16 = np.frombuffer(wav[44:], dtype="<i2")
    # the page's encoding exactly: JS Math.round (half up) of the clipped double
    samples_f64 = np.asarray(result["audio"], dtype=np.float64)
    np.testing.assert_array_equal(pcm16, np.floor(np.clip(samples_f64, -1, 1) * 32767 + 0.5))
