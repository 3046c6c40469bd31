"""Training-batch throughput from the token cache vs decoding + encoding audio on the fly, side by side.

Both loaders serve the same thing (random ``--segment`` s windows of a folder of 44.1 kHz stereo WAVs,
as ``codes [B, K, T]`` + tokenised captions); the on-the-fly one decodes, downmixes, resamples and runs the
codec for every batch, the cached one slices codes prepared once. Epochs alternate between the two
(``--epochs`` each) and the median clips/s of each is reported, with the one-off preparation time and the
number of epochs after which the cache has paid for itself.

    python benchmarks/bench_dataloader.py [--codec tiny|encodec32k] [--clips 48] [--seconds 8]

``tiny`` is the embedded test codec (16 kHz, 0.1M params); ``encodec32k`` is MusicGen's EnCodec 32 kHz
architecture with random weights (same cost as the real one, no download).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import EncodecModel

from tinymusician.data.audio import load_audio
from tinymusician.data.codec_tokens import encode_audio
from tinymusician.data.folder import FolderDataModule
from tinymusician.data.segments import CaptionCollator, SegmentDataset
from tinymusician.models.musicgen import codec_hop, encodec_32khz_config
from tinymusician.zoo.tiny import TinySpec, build_tokenizer, build_untrained_pair


def build_codec(name: str) -> SimpleNamespace:
    """An object with ``audio_encoder``, all the data pipeline needs from a MusicGen model."""
    if name == "tiny":
        _, student, _ = build_untrained_pair(TinySpec())
        return SimpleNamespace(audio_encoder=student.audio_encoder.eval())
    config = encodec_32khz_config(chunk_length_s=None, overlap=None)
    torch.manual_seed(0)
    return SimpleNamespace(audio_encoder=EncodecModel(config).eval())


def write_folder(root: Path, clips: int, seconds: float) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(clips):
        t = np.arange(int(seconds * 44100)) / 44100
        left = 0.3 * np.sin(2 * np.pi * (110 + 20 * i) * t) + 0.02 * rng.standard_normal(len(t))
        sf.write(root / f"clip{i:03d}.wav", np.stack([left, np.roll(left, 7)], axis=1), 44100)
        rows.append({"file_name": f"clip{i:03d}.wav", "text": f"a bright flute tune number {i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


class OnTheFlyDataset(Dataset):
    """What training would do without the cache: decode, downmix, resample, cut a random window."""

    def __init__(self, data: FolderDataModule, sample_rate: int, segment_samples: int) -> None:
        self.clips = [clip for clip in data.listing.clips if clip.split == "train"]
        self.sample_rate, self.segment_samples = sample_rate, segment_samples

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        clip = self.clips[index]
        audio = load_audio(clip.path, self.sample_rate)
        start = int(torch.randint(0, max(len(audio) - self.segment_samples, 0) + 1, ()))
        return {"audio": audio[start : start + self.segment_samples], "caption": clip.caption}


class EncodingCollator:
    """Runs the codec on each batch, then tokenises like the cached path's collator."""

    def __init__(self, model: SimpleNamespace, captions: CaptionCollator) -> None:
        self.model, self.captions = model, captions

    def __call__(self, items: list[dict]) -> dict:
        codes = encode_audio(self.model, [item["audio"] for item in items], batch_size=len(items))
        return self.captions(
            [
                {"codes": c, "length": c.shape[-1], "caption": item["caption"]}
                for c, item in zip(codes, items, strict=True)
            ]
        )


def epoch_rate(loader: DataLoader) -> float:
    """Clips per second over one pass of ``loader``."""
    start, clips = time.perf_counter(), 0
    for batch in loader:
        clips += batch["codes"].shape[0]
    return clips / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codec", choices=("tiny", "encodec32k"), default="tiny")
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each audio file")
    parser.add_argument("--segment", type=float, default=5.0, help="training window (s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each loader, interleaved")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build_codec(args.codec)
    codec = model.audio_encoder
    rate, hop = codec.config.sampling_rate, codec_hop(codec.config)
    params = sum(p.numel() for p in codec.parameters()) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "music", Path(tmp) / "cache"
        root.mkdir()
        write_folder(root, args.clips, args.seconds)
        data = FolderDataModule(
            root=str(root),
            cache_dir=str(cache),
            val_fraction=0.0,
            segment_seconds=args.segment,
            min_seconds=0.5,
        )
        encode_audio(model, [np.zeros(rate * 2, dtype=np.float32)])  # warm-up, as both loaders get below
        start = time.perf_counter()
        splits = data.load_splits(model)
        prepare_s = time.perf_counter() - start

        collate = CaptionCollator(build_tokenizer())
        frames = round(args.segment * rate / hop)
        cached = DataLoader(
            SegmentDataset(splits["train"], frames, random_offsets=True),
            batch_size=args.batch_size,
            shuffle=True,
            collate_fn=collate,
        )
        on_the_fly = DataLoader(
            OnTheFlyDataset(data, rate, frames * hop),
            batch_size=args.batch_size,
            shuffle=True,
            collate_fn=EncodingCollator(model, collate),
        )
        a, b = next(iter(cached)), next(iter(on_the_fly))  # warm-up; both give the same batch layout
        assert a["codes"].shape == b["codes"].shape and a.keys() == b.keys()
        rates: dict[str, list[float]] = {"cached": [], "on_the_fly": []}
        for _ in range(args.epochs):
            rates["on_the_fly"].append(epoch_rate(on_the_fly))
            rates["cached"].append(epoch_rate(cached))

    cached_rate, fly_rate = (statistics.median(rates[k]) for k in ("cached", "on_the_fly"))
    epoch_saving = args.clips / fly_rate - args.clips / cached_rate
    print(
        f"codec {args.codec} ({params:.1f}M params, {rate} Hz), {args.clips} clips x {args.seconds:g} s "
        f"(44.1 kHz stereo WAV), {args.segment:g} s windows, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"  on the fly (decode + resample + encode per batch): {fly_rate:10.1f} clips/s")
    print(f"  token cache (slice cached codes):                  {cached_rate:10.1f} clips/s")
    print(f"  ratio cached / on the fly:                         {cached_rate / fly_rate:10.1f}x")
    print(
        f"  one-off preparation: {prepare_s:.2f} s for {args.clips} clips "
        f"(= {prepare_s / max(epoch_saving, 1e-9):.1f} epochs of the time the cache saves)"
    )


if __name__ == "__main__":
    main()
