// Generate with transformers.js from a TinyMusician ONNX bundle and write the codes and audio as JSON.
// Usage: node generate.mjs BUNDLE_DIR DTYPE OUT.json MAX_NEW_TOKENS GUIDANCE PROMPT [PROMPT...]
//   DTYPE: fp32 | q8 (text encoder + decoder 8-bit, codec decoder fp32) | q4
import path from 'node:path';
import { writeFileSync } from 'node:fs';
import { AutoTokenizer, MusicgenForConditionalGeneration, PreTrainedModel, env } from '@huggingface/transformers';

const [bundle, dtypeName, out, maxNewTokens, guidance, ...prompts] = process.argv.slice(2);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(bundle));
const id = path.basename(path.resolve(bundle));

const dtype = dtypeName === 'fp32'
  ? 'fp32'
  : { text_encoder: dtypeName, decoder_model_merged: dtypeName, encodec_decode: 'fp32' };
const tokenizer = await AutoTokenizer.from_pretrained(id);
const model = await MusicgenForConditionalGeneration.from_pretrained(id, { dtype, device: 'cpu' });
const inputs = tokenizer(prompts, { padding: true });
const options = {
  ...inputs,
  max_new_tokens: Number(maxNewTokens),
  do_sample: false,
  guidance_scale: Number(guidance),
};
// The generic generate() returns the delayed ids; MusicGen's own generate() decodes them to audio.
const ids = await PreTrainedModel.prototype.generate.call(model, options);
const codes = model._apply_and_filter_by_delay_pattern_mask(ids);
const audio = await model.generate(options);
writeFileSync(out, JSON.stringify({
  codes: { dims: codes.dims, data: Array.from(codes.data, Number) },
  audio: { dims: audio.dims, data: Array.from(audio.data) },
  input_ids: { dims: inputs.input_ids.dims, data: Array.from(inputs.input_ids.data, Number) },
}));
await model.dispose();
