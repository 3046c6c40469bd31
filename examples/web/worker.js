// Runs transformers.js off the main thread (a WASM session.run blocks its thread: the page would freeze).
// Messages in: {type: 'generate', ...job}; out: status, progress, result (codes, input ids, audio) or error.
import {
  AutoTokenizer,
  MusicgenForConditionalGeneration,
  env,
} from '/node_modules/@huggingface/transformers/dist/transformers.min.js';

let loaded = null; // {dtype, tokenizer, model}
let lastCodes = null;

function configure(job) {
  env.allowRemoteModels = false; // local files only: no Hugging Face Hub, no CDN
  env.allowLocalModels = true;
  env.localModelPath = job.modelPath; // root-relative ('/models/'): a full URL breaks AutoTokenizer (4.3.2)
  env.useBrowserCache = false; // a re-exported bundle under the same name must not come from the cache
  const wasm = env.backends.onnx.wasm;
  wasm.wasmPaths = job.wasmPaths; // the locally served onnxruntime-web, not jsDelivr
  wasm.numThreads = job.threads;
}

// transformers.js 4.3.2: fp32 everywhere, or 8/4-bit text encoder + decoder with the fp32 codec decoder
// (the bundle has no quantized codec; tests/js/generate.mjs maps the same way).
function dtypeOption(name) {
  return name === 'fp32' ? 'fp32' : { text_encoder: name, decoder_model_merged: name, encodec_decode: 'fp32' };
}

async function load(job) {
  if (loaded?.dtype === job.dtype) return loaded;
  if (loaded === null) configure(job);
  else await loaded.model.dispose();
  loaded = null;
  postMessage({ type: 'status', text: `Loading ${job.model} (${job.dtype})…` });
  const started = performance.now();
  const tokenizer = await AutoTokenizer.from_pretrained(job.model);
  const model = await MusicgenForConditionalGeneration.from_pretrained(job.model, {
    dtype: dtypeOption(job.dtype),
    device: 'wasm',
  });
  // MusicGen's generate() undelays the ids into codes and decodes them in one call; keep a copy of the codes
  // (the result page and the browser test compare them with Python's) without generating twice.
  const undelay = model._apply_and_filter_by_delay_pattern_mask;
  model._apply_and_filter_by_delay_pattern_mask = function (ids) {
    const codes = undelay.call(this, ids);
    lastCodes = { dims: [...codes.dims], data: Array.from(codes.data, Number) };
    return codes;
  };
  loaded = { dtype: job.dtype, tokenizer, model, load_s: (performance.now() - started) / 1000 };
  return loaded;
}

async function generate(job) {
  const { tokenizer, model, load_s } = await load(job);
  postMessage({ type: 'status', text: 'Generating…' });
  const started = performance.now();
  const inputs = tokenizer([job.prompt], { padding: true });
  let step = -1; // the streamer first receives the start ids, then one token per step
  const streamer = {
    put() {
      if (++step > 0) postMessage({ type: 'progress', step, total: job.max_new_tokens });
    },
    end() {},
  };
  lastCodes = null;
  const audio = await model.generate({
    ...inputs,
    max_new_tokens: job.max_new_tokens,
    do_sample: !job.greedy,
    guidance_scale: job.guidance,
    streamer,
  });
  const compute_s = (performance.now() - started) / 1000;
  const samples = new Float32Array(audio.data); // [1, 1, samples]
  postMessage(
    {
      type: 'result',
      codes: lastCodes,
      input_ids: { dims: [...inputs.input_ids.dims], data: Array.from(inputs.input_ids.data, Number) },
      audio: samples,
      compute_s,
      load_s,
    },
    [samples.buffer],
  );
}

onmessage = async ({ data }) => {
  try {
    if (data.type === 'generate') await generate(data);
  } catch (err) {
    postMessage({ type: 'error', message: String(err?.message ?? err), stack: String(err?.stack ?? '') });
  }
};
