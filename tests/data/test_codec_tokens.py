"""Codec tokenisation: long clips encoded in pieces give the same frame count and mostly the same codes."""

from __future__ import annotations

from tinymusician.data.codec_tokens import encode_audio
from tinymusician.data.synthetic import synthesize_corpus


def test_long_clips_are_encoded_in_pieces_with_the_same_frame_count(student):
    rate = student.audio_encoder.config.sampling_rate
    clip = synthesize_corpus(1, seed=3, seconds=3.0, sample_rate=rate)[0].audio
    whole = encode_audio(student, [clip, clip[:12345]])
    pieces = encode_audio(student, [clip, clip[:12345]], chunk_samples=rate)
    assert [c.shape[-1] for c in whole] == [c.shape[-1] for c in pieces] == [150, 39]
    # pieces only differ near their joins (the encoder's receptive field); most codes agree
    assert (whole[0] == pieces[0]).float().mean() > 0.7
