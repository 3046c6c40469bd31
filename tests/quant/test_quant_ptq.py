"""Post-training quantization: dtypes per component, sizes, the original left intact, generation, bundles."""

import json
import pickle

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from tinymusician.models.musicgen import load_tokenizer
from tinymusician.quant import (
    PrecisionPlan,
    apply_plan,
    load_quantized,
    quantize_model,
    resolve_plan,
    save_quantized,
)
from tinymusician.quant.bundle import BUNDLE_FORMAT, PLAN_FILE, STATE_FILE, BundleError
from tinymusician.quant.fidelity import ReferenceLogits
from tinymusician.quant.ptq import CodecEncoderRemoved, decoder_blocks
from tinymusician.quant.size import MB, component_sizes

MIXED = PrecisionPlan(
    text_encoder="bf16", decoder="int8", codec="fp16", decoder_blocks={1: "fp16", 2: "fp32"}
)


def float_dtypes(module: nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters() if p.is_floating_point()}


def linears(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Linear, DynamicInt8Linear))]


def int8_weight(linear: nn.Module) -> bool:
    return isinstance(linear, DynamicInt8Linear) and linear.weight().dtype == torch.qint8


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_paper_plan_dtypes_per_component(student):
    model = quantize_model(student, resolve_plan("paper"))
    t5_linears = linears(model.text_encoder)
    assert t5_linears and all(int8_weight(m) for m in t5_linears)
    assert model.text_encoder.shared.weight.dtype == torch.float32  # only Linear layers are int8
    assert model.text_encoder.shared.weight is model.text_encoder.encoder.embed_tokens.weight  # still tied
    assert float_dtypes(model.decoder) == {torch.float16}
    assert not any(isinstance(m, DynamicInt8Linear) for m in model.decoder.modules())
    assert float_dtypes(model.audio_encoder) == {torch.float32}
    assert isinstance(model.audio_encoder.encoder, CodecEncoderRemoved)


def test_int8_plan_quantizes_every_decoder_linear_but_not_embeddings(student):
    model = quantize_model(student, resolve_plan("int8"))
    assert all(int8_weight(m) for m in linears(model.decoder))
    assert len(linears(model.decoder)) == len(linears(student.decoder))
    assert float_dtypes(model.decoder) == {torch.float32}  # embeddings and norms


def test_per_block_overrides_and_projection(projected):
    model = quantize_model(projected, MIXED)
    blocks = decoder_blocks(model)
    assert all(int8_weight(m) for m in linears(blocks[0]))
    assert float_dtypes(blocks[1]) == {torch.float16} and not any(int8_weight(m) for m in linears(blocks[1]))
    assert float_dtypes(blocks[2]) == {torch.float32} and not any(int8_weight(m) for m in linears(blocks[2]))
    assert all(int8_weight(m) for m in model.decoder.lm_heads)
    assert model.enc_to_dec_proj.weight.dtype == torch.float32  # stays float (the decoder's compute dtype)
    assert float_dtypes(model.text_encoder) == {torch.bfloat16}
    assert float_dtypes(model.audio_encoder) == {torch.float16}


def test_sizes_shrink_by_the_expected_factor(student):
    before = component_sizes(student)
    after = component_sizes(quantize_model(student, resolve_plan("paper")))
    assert after["decoder"] == pytest.approx(before["decoder"] / 2, rel=1e-9)  # every decoder tensor fp16
    assert after["codec"] == pytest.approx(before["codec"], rel=1e-9)
    assert after["codec_encoder"] == 0.0 < before["codec_encoder"]
    # T5 int8: 1 byte per Linear weight + a float64 scale and an int64 zero point per output channel
    # (+ torch.ao's unused per-layer activation scale/zero point: 4 + 8 bytes)
    t5_linear = [m for m in student.text_encoder.modules() if isinstance(m, nn.Linear)]
    linear_elements = sum(m.weight.numel() for m in t5_linear)
    int8_bytes = linear_elements + sum(m.out_features for m in t5_linear) * 16 + len(t5_linear) * 12
    expected = before["text_encoder"] - (linear_elements * 4 - int8_bytes) / MB
    assert after["text_encoder"] == pytest.approx(expected, rel=1e-9)
    assert after["text_encoder"] < before["text_encoder"] / 2
    assert after["total"] == pytest.approx(sum(v for k, v in after.items() if k != "total"))


@pytest.mark.parametrize("share", [False, True])
def test_quantizing_leaves_the_original_untouched(student, share):
    before = state_copy(student)
    for plan in (
        resolve_plan("paper"),
        resolve_plan("int8"),
        PrecisionPlan(decoder="fp16", decoder_blocks={0: "fp32"}),
    ):
        quantize_model(student, plan, share_unchanged=share)
    after = student.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert not isinstance(student.audio_encoder.encoder, CodecEncoderRemoved)
    assert not hasattr(student, "precision_plan")


def test_identity_plan_agrees_exactly(student, batches):
    fidelity = ReferenceLogits(student, batches).compare(quantize_model(student, resolve_plan("fp32")))
    assert fidelity.top1_agree == 1.0 and fidelity.kl == 0.0 and fidelity.max_logit_diff == 0.0
    assert fidelity.relative_error == 0.0
    assert fidelity.top1_agree_per_codebook == [1.0] * 4
    # positions: only valid ones count (the last clip of each batch is half as long)
    frames = batches[0]["codes"].shape[-1]
    per_batch = 4 * (3 * frames + frames // 2)
    assert fidelity.positions == len(batches) * per_batch


def test_fidelity_matches_an_independent_computation(student, batches):
    """Break codebook 1's LM head: only q1 disagrees; KL and agreement match a direct computation."""
    from tinymusician.quant.fidelity import teacher_forced_logits

    broken = quantize_model(student, resolve_plan("fp32"))
    with torch.no_grad():
        broken.decoder.lm_heads[1].weight.mul_(-1.0)
    fidelity = ReferenceLogits(student, batches).compare(broken)
    agree, kl, count, max_diff = torch.zeros(4), torch.zeros(4), torch.zeros(4), 0.0
    error_sq = spread_sq = 0.0
    for batch in batches:
        p_logits, valid = teacher_forced_logits(student, batch)
        q_logits, _ = teacher_forced_logits(broken, batch)
        log_p, log_q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
        per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
        agree += ((p_logits.argmax(-1) == q_logits.argmax(-1)) & valid).sum(dim=(0, 2))
        kl += (per_position * valid).sum(dim=(0, 2))
        count += valid.sum(dim=(0, 2))
        max_diff = max(max_diff, float((p_logits - q_logits).abs()[valid].max()))
        centred = [x[valid].double() - x[valid].double().mean(-1, keepdim=True) for x in (p_logits, q_logits)]
        error_sq += float((centred[1] - centred[0]).square().sum())
        spread_sq += float(centred[0].square().sum())
    assert fidelity.top1_agree_per_codebook[0] == fidelity.top1_agree_per_codebook[2] == 1.0
    assert fidelity.top1_agree_per_codebook[1] < 0.5
    torch.testing.assert_close(
        torch.tensor(fidelity.top1_agree_per_codebook), agree / count, rtol=0, atol=1e-6
    )
    assert fidelity.top1_agree == pytest.approx(float(agree.sum() / count.sum()))
    torch.testing.assert_close(torch.tensor(fidelity.kl_per_codebook), kl / count, rtol=1e-4, atol=1e-7)
    assert fidelity.kl == pytest.approx(float(kl.sum() / count.sum()), rel=1e-4)
    assert fidelity.max_logit_diff == pytest.approx(max_diff)
    assert fidelity.relative_error == pytest.approx((error_sq / spread_sq) ** 0.5, rel=1e-6)
    assert 0.1 < fidelity.relative_error < 1.5 and not fidelity.meets(max_relative_error=0.05)


# --- the int8 plan on every CPU: torch.ao's engines -----------------------------------------------------
# fbgemm/x86 (x86's default) multiply uint8 activations by int8 weights with VPMADDUBSW, which saturates its
# pairwise 16-bit sums on AVX2 without VNNI unless activations have 7 bits (torch.ao's dynamic Linear asks
# for reduce_range); qnnpack (ARM's default) is exact at 8 bits. Measured on this AVX2 CPU (relative logit
# error, tiny models): fbgemm/x86 0.012, qnnpack 0.008-0.009, the same as a float emulation of exact products.
ENGINES = ["x86", "fbgemm", "qnnpack"]


@pytest.fixture
def engine(request):
    name = request.param
    if name not in torch.backends.quantized.supported_engines:
        pytest.skip(f"quantized engine {name} is not built into this torch (only on its CPU family)")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    yield name
    torch.backends.quantized.engine = previous


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_int8_linear_is_exact_for_worst_case_operands(engine):
    """The largest activations (quantized to the top of their range) times the largest weights of both signs,
    summed over 512 inputs: a saturating kernel returns about half of the exact sum."""
    from tinymusician.quant.ptq import quantize_linears

    layer = nn.Sequential(nn.Linear(512, 4))
    with torch.no_grad():
        layer[0].weight.copy_(torch.tensor([1.0, -1.0, 0.5, -0.25])[:, None].expand(4, 512))
        layer[0].bias.zero_()
    quantize_linears(layer, ["0"])
    assert int8_weight(layer[0])
    x = torch.full((2, 512), 3.0)  # the range is [0, 3]: every value quantizes exactly to the largest code
    expected = x.double() @ layer[0].weight().dequantize().double().T
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_int8_plan_logits_stay_close_on_the_trained_teacher(engine, tiny_pair, corpus_batch_maker):
    """On the teacher's own kind of input (corpus codes, captions). Measured here (x86/fbgemm, qnnpack): top-1
    0.959 / 0.974, relative error 0.030 / 0.015; on random codes top-1 drops to 0.924 on x86."""
    from tinymusician.models.musicgen import load_musicgen

    teacher = load_musicgen(str(tiny_pair.teacher))
    tokenizer = load_tokenizer(str(tiny_pair.teacher))
    fidelity = ReferenceLogits(teacher, corpus_batch_maker(teacher, tokenizer)).compare(
        quantize_model(teacher, resolve_plan("int8"))
    )
    assert fidelity.meets(min_top1_agree=0.95, max_relative_error=0.05), fidelity


@pytest.fixture(scope="module")
def fp32_audio(projected, tokenizer):
    inputs = tokenizer(["a calm piano melody", "fast drums"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return inputs, projected.generate(**inputs, guidance_scale=3.0, max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("plan", ["paper", "int8", "mixed"])
def test_quantized_model_generates_finite_audio_of_the_right_length(projected, fp32_audio, plan):
    """On a model with enc_to_dec_proj: generate() must cast T5 -> projection -> decoder by itself."""
    model = quantize_model(projected, MIXED if plan == "mixed" else resolve_plan(plan))
    inputs, reference = fp32_audio
    with torch.no_grad():
        audio = model.generate(**inputs, guidance_scale=3.0, max_new_tokens=8, do_sample=False)
    hop = 320  # the tiny codec: 16 kHz, 50 frames/s
    frames = 8 - (model.config.decoder.num_codebooks - 1)  # the delay pattern's tail is dropped
    assert audio.shape == reference.shape == (2, 1, frames * hop)
    assert torch.isfinite(audio.float()).all() and audio.float().abs().sum() > 0


def test_bundle_round_trips_through_load_and_generate(student, tokenizer, batches, tmp_path):
    quantized = quantize_model(
        student, MIXED.__class__(text_encoder="int8", decoder="int8", decoder_blocks={0: "fp16"})
    )
    save_quantized(quantized, tmp_path, tokenizer)
    meta = json.loads((tmp_path / PLAN_FILE).read_text())
    assert meta["format"] == BUNDLE_FORMAT and meta["plan"]["decoder_blocks"] == {"0": "fp16"}
    assert not any(
        k.startswith("audio_encoder.encoder.") for k in torch.load(tmp_path / STATE_FILE, weights_only=True)
    )
    loaded = load_quantized(tmp_path)
    assert loaded.precision_plan == quantized.precision_plan
    reference = ReferenceLogits(student, batches)
    in_memory, reloaded = reference.compare(quantized), reference.compare(loaded)
    assert reloaded == in_memory  # bit-identical logits
    bundle_tokenizer = load_tokenizer(str(tmp_path))
    inputs = bundle_tokenizer(["slow organ chords"], return_tensors="pt")
    torch.manual_seed(0)
    audio = loaded.generate(**inputs, guidance_scale=3.0, max_new_tokens=10)
    assert audio.shape == (1, 1, 7 * 320) and torch.isfinite(audio).all()


def test_bundle_loading_never_unpickles_code(student, tmp_path):
    save_quantized(quantize_model(student, resolve_plan("int8")), tmp_path)

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled code ran",))

    with open(tmp_path / STATE_FILE, "wb") as f:
        pickle.dump({"x": Payload()}, f)
    with pytest.raises(BundleError, match="not a state dict of tensors"):
        load_quantized(tmp_path)
    with pytest.raises(BundleError, match="not a quantized bundle"):
        load_quantized(tmp_path / "nowhere")


def test_apply_plan_rejects_blocks_beyond_the_decoder(student):
    import copy

    with pytest.raises(ValueError, match=r"blocks \[7\].*has 2 blocks"):
        apply_plan(copy.deepcopy(student), PrecisionPlan(decoder="int8", decoder_blocks={7: "fp16"}))
