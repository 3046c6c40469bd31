import pytest
import torch
from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

from tinymusician.models.delay import delay_codes, delay_pattern, undelay_codes

PAD = 32


def random_codes(batch=2, k=4, t=7, seed=0):
    return torch.randint(0, PAD, (batch, k, t), generator=torch.Generator().manual_seed(seed))


def test_matches_transformers_build_delay_pattern_mask():
    codes = random_codes()
    batch, k, t = codes.shape
    decoder = MusicgenForCausalLM(
        MusicgenDecoderConfig(
            vocab_size=PAD,
            num_codebooks=k,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=8,
            pad_token_id=PAD,
            bos_token_id=PAD,
        )
    )
    with_bos = torch.cat([torch.full((batch, k, 1), PAD), codes], dim=-1).reshape(batch * k, t + 1)
    _, pattern = decoder.build_delay_pattern_mask(with_bos, pad_token_id=PAD, max_length=t + k)
    assert torch.equal(delay_codes(codes, PAD), pattern.reshape(batch, k, t + k))


def test_round_trip_and_shift():
    codes = random_codes(t=11)
    delayed = delay_pattern(codes, PAD)
    assert delayed.inputs.shape == delayed.labels.shape == delayed.valid.shape == (2, 4, 11 + 3)
    assert torch.equal(undelay_codes(delay_codes(codes, PAD), 11), codes)
    assert torch.equal(undelay_codes(delayed.labels, 11), codes)
    assert torch.equal(delayed.inputs[..., 1:], delay_codes(codes, PAD)[..., 1:-1])
    assert (delayed.inputs[:, :, 0] == PAD).all()  # BOS


def test_valid_marks_exactly_the_real_codes():
    codes = random_codes(t=5)
    delayed = delay_pattern(codes, PAD)
    assert delayed.valid.sum() == codes.numel()
    assert (delayed.labels[delayed.valid] < PAD).all()
    assert (delayed.labels[~delayed.valid] == PAD).all()
    for k in range(4):  # codebook k starts k steps late
        assert delayed.valid[0, k].nonzero().flatten().tolist() == list(range(k, k + 5))


@pytest.mark.parametrize("lengths", [[5, 3], [1, 5]])
def test_sequence_padding_is_invalid(lengths):
    codes = random_codes(t=5)
    delayed = delay_pattern(codes, PAD, torch.tensor(lengths))
    for b, length in enumerate(lengths):
        assert delayed.valid[b].sum() == 4 * length
        assert torch.equal(undelay_codes(delayed.labels, 5)[b, :, :length], codes[b, :, :length])
