import pytest
import torch

from tinymusician.models.delay import delay_pattern
from tinymusician.models.musicgen import (
    ModelSourceError,
    check_model_source,
    codec_encode,
    decoder_logits,
    encode_text,
    load_musicgen,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def loaded(tiny_pair):
    model = load_musicgen(str(tiny_pair.student)).eval()
    return model, load_tokenizer(str(tiny_pair.student))


def batch_for(model, tokenizer, captions, frames=12, seed=0):
    codes = torch.randint(
        0,
        model.config.decoder.vocab_size,
        (len(captions), 4, frames),
        generator=torch.Generator().manual_seed(seed),
    )
    text = tokenizer(captions, padding=True, return_tensors="pt")
    return codes, text


def logits_for(model, text, inputs):
    with torch.no_grad():
        hidden = encode_text(model, text.input_ids, text.attention_mask)
        return decoder_logits(model, hidden, text.attention_mask, inputs)


def test_decoder_logits_match_the_hf_forward_layout(loaded):
    model, tokenizer = loaded
    codes, text = batch_for(model, tokenizer, ["a fast organ melody", "quiet bell tune in a low register"])
    inputs = delay_pattern(codes, model.config.decoder.pad_token_id).inputs
    ours = logits_for(model, text, inputs)
    with torch.no_grad():
        hf = model(
            input_ids=text.input_ids,
            attention_mask=text.attention_mask,
            decoder_input_ids=inputs.reshape(-1, inputs.shape[-1]),
        ).logits
    b, k, t = inputs.shape
    assert ours.shape == (b, k, t, model.config.decoder.vocab_size)
    torch.testing.assert_close(ours, hf.reshape(b, k, t, -1), rtol=1e-5, atol=1e-5)


def test_decoder_is_causal(loaded):
    model, tokenizer = loaded
    codes, text = batch_for(model, tokenizer, ["a slow flute melody"])
    inputs = delay_pattern(codes, model.config.decoder.pad_token_id).inputs
    changed = inputs.clone()
    changed[:, :, 8:] = (changed[:, :, 8:] + 1) % model.config.decoder.vocab_size
    before, after = logits_for(model, text, inputs), logits_for(model, text, changed)
    torch.testing.assert_close(before[:, :, :8], after[:, :, :8])
    assert not torch.allclose(before[:, :, 8:], after[:, :, 8:])


def test_text_padding_does_not_leak(loaded):
    model, tokenizer = loaded
    codes, text = batch_for(model, tokenizer, ["loud organ"])
    long_codes, long_text = batch_for(
        model, tokenizer, ["loud organ", "a very quiet, slow bell tune, minor key"]
    )
    assert long_text.attention_mask[0].sum() < long_text.attention_mask.shape[1]  # row 0 is padded
    inputs = delay_pattern(codes, model.config.decoder.pad_token_id).inputs
    alone = logits_for(model, text, inputs)
    padded = logits_for(model, long_text, torch.cat([inputs, inputs]))[:1]
    torch.testing.assert_close(alone, padded, rtol=1e-4, atol=1e-5)
    # ...while the caption itself does matter
    other = logits_for(model, tokenizer(["quiet bell"], return_tensors="pt"), inputs)
    assert not torch.allclose(alone, other)


def test_codec_uses_many_codes(loaded, tiny_pair):
    model, _ = loaded
    from tinymusician.data.synthetic import synthesize_corpus

    audio = torch.stack([torch.from_numpy(c.audio) for c in synthesize_corpus(4, seed=3)])
    with torch.no_grad():
        codes = codec_encode(model, audio)
    assert codes.shape == (4, 4, 100)  # 2 s at 50 frames/s, 4 codebooks
    assert all(codes[:, k].unique().numel() > 20 for k in range(4))


def test_missing_local_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match="model.student.*does not exist"):
        check_model_source(str(tmp_path / "nope"), "model.student")
    with pytest.raises(ModelSourceError, match="no config.json"):
        check_model_source(str(tmp_path), "model.student")


def test_hub_id_offline_names_the_model_and_the_fix():
    with pytest.raises(ModelSourceError) as info:
        check_model_source("facebook/musicgen-large", "model.teacher")
    message = str(info.value)
    assert (
        "facebook/musicgen-large" in message and "model.teacher" in message and "offline" in message.lower()
    )
