"""Embedding throughput of the FAD/CLAP embedders on CPU: seconds of audio embedded per second of compute.

Full-size architectures with random weights, built offline from configs: CLAP HTSAT (ClapConfig defaults),
VGGish (torchvggish layout, loaded from a .pth like the real weights) and MusicGen's EnCodec 32 kHz encoder.
Input is 32 kHz audio (MusicGen's rate), so the times include resampling to each embedder's rate.

    python benchmarks/bench_embedders.py [--clips 4] [--seconds 10] [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from tinymusician.metrics.audio import prepare_clips
from tinymusician.metrics.embedders import ClapEmbedder, EncodecEmbedder, VGGishEmbedder
from tinymusician.metrics.vggish import VGGish


def build_clap() -> ClapEmbedder:
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    model = ClapModel(ClapConfig()).eval()  # HTSAT-base audio tower + RoBERTa-base text tower
    extractor = ClapFeatureExtractor(
        truncation="rand_trunc", padding="repeatpad"
    )  # LAION: 48 kHz, 10 s window
    return ClapEmbedder(
        None, model=model, processor=ClapProcessor(feature_extractor=extractor, tokenizer=RobertaTokenizer())
    )


def build_vggish(directory: Path) -> VGGishEmbedder:
    path = directory / "vggish-random.pth"
    torch.save(VGGish().state_dict(), path)
    return VGGishEmbedder(path)


def build_encodec() -> EncodecEmbedder:
    from transformers import EncodecModel

    from tinymusician.models.musicgen import encodec_32khz_config

    config = encodec_32khz_config(use_causal_conv=False, norm_type="weight_norm", pad_mode="constant")
    return EncodecEmbedder("encodec_32khz (random weights)", codec=EncodecModel(config).eval())


def params(embedder) -> int:
    """Parameters of the part that embeds audio (CLAP's audio tower, EnCodec's encoder)."""
    if embedder.name == "clap":
        model = embedder._model.audio_model
    elif embedder.name == "encodec":
        model = embedder._codec.encoder
    else:
        model = embedder._model
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rate = 32000
    audio = 0.1 * torch.randn(
        args.clips, int(args.seconds * rate), generator=torch.Generator().manual_seed(0)
    )
    total_seconds = args.clips * args.seconds
    print(
        f"{args.clips} clips x {args.seconds:g} s at {rate} Hz, {args.threads} threads, best of {args.repeats}\n"
        f"{'embedder':<10} {'rate':>6} {'dim':>5} {'params':>8} {'frames/clip':>11} {'resample s':>10} "
        f"{'embed s':>8} {'audio s / s':>11} {'x vggish':>8}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for build in (lambda: build_clap(), lambda: build_vggish(Path(tmp)), build_encodec):
            embedder = build().load()
            embedder.embed(audio[:1, : rate * 2], rate)  # warm-up
            resample_time = embed_time = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                prepare_clips(audio, rate, embedder.sample_rate, who="bench")
                resample_time = min(resample_time, time.perf_counter() - start)
                start = time.perf_counter()
                frames = embedder.embed(audio, rate)
                embed_time = min(embed_time, time.perf_counter() - start)
            rows.append((embedder, frames[0].shape[0], resample_time, embed_time, params(embedder)))
            embedder.unload()
    vggish_speed = next(total_seconds / t for e, _, _, t, _ in rows if e.name == "vggish")
    for embedder, frames, resample_time, embed_time, count in rows:
        speed = total_seconds / embed_time
        print(
            f"{embedder.name:<10} {embedder.sample_rate:>6} {embedder.dim:>5} {count / 1e6:>7.1f}M {frames:>11} "
            f"{resample_time:>10.3f} {embed_time:>8.2f} {speed:>11.1f} {speed / vggish_speed:>8.2f}"
        )


if __name__ == "__main__":
    main()
