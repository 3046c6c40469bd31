"""Metric state syncs across processes: 2 gloo workers on shards == one process on everything."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


class FrameStub:
    name = "stub"
    dim = 4

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim}


class PairStub:
    """Audio 'embedding' = the clip itself (4 samples), text embedding = a fixed vector per prompt index."""

    name = "pair-stub"

    def embed_clips(self, audio, sample_rate):
        return torch.stack(list(audio)).double()

    def embed_text(self, texts):
        return torch.stack([torch.arange(4, dtype=torch.float64) + int(t) for t in texts])

    def describe(self) -> dict:
        return {"name": self.name}


def data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "real": torch.randn(60, 4, generator=generator, dtype=torch.float64),
        "fake": torch.randn(50, 4, generator=generator, dtype=torch.float64) * 1.3 + 0.2,
        "clips": torch.randn(10, 4, generator=generator),
    }


def compute(rank: int, world: int) -> dict[str, torch.Tensor]:
    from tinymusician.metrics import CLAPScore, FrechetAudioDistance

    tensors = data()
    fad = FrechetAudioDistance(FrameStub(), fad_inf=True, inf_min_n=10, inf_steps=5)
    fad.update_embeddings(tensors["real"][rank::world], real=True)
    fad.update_embeddings(tensors["fake"][rank::world])
    clap = CLAPScore(PairStub())
    indices = list(range(10))[rank::world]
    clap.update([tensors["clips"][i] for i in indices], [str(i) for i in indices], 16000)
    summary = fad.summary()
    return {
        "fad": fad.compute(),
        "fad_inf": torch.tensor(summary["fad_inf"]["fad_inf"]),
        "n_frames": torch.tensor(summary["n_frames"]),
        "clap": clap.compute(),
        "clap_n": torch.tensor(len(clap.per_clip())),
        "reference_mean": fad.stats(real=True).mean,
    }


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(compute(rank, WORLD), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fad_and_clap_states_sync_across_two_processes(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single = compute(0, 1)
    for rank in range(WORLD):
        synced = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert int(synced["n_frames"]) == 50 and int(synced["clap_n"]) == 10
        for key in ("fad", "clap", "reference_mean"):
            torch.testing.assert_close(synced[key], single[key], rtol=1e-10, atol=1e-12)
        # FAD-inf subsamples the gathered frames, whose order differs from one process's order
        torch.testing.assert_close(synced["fad_inf"], single["fad_inf"], rtol=0.5, atol=0.05)
