"""FAD: math properties, parity with closed forms and scipy, state handling, statistics files, FAD-inf."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from tinymusician.metrics import (
    EmbeddingStats,
    FADError,
    FrechetAudioDistance,
    VGGishEmbedder,
    fad_infinity,
    frechet_distance,
    load_stats,
    save_stats,
)


class FrameStub:
    """An embedder stand-in for metric-level tests that feed embeddings directly."""

    name = "stub"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "source": "test"}


def gaussian(n: int, mean: torch.Tensor, cov_root: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, mean.shape[0], generator=generator, dtype=torch.float64)
    return mean.double() + noise @ cov_root.double().T


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fad_of_a_set_against_itself_is_zero(tiny_vggish_path, make_clips):
    frames = gaussian(300, torch.zeros(6), torch.eye(6) * 2, seed=0)
    stats = EmbeddingStats.from_embeddings(frames)
    assert float(frechet_distance(stats.mean, stats.cov, stats.mean, stats.cov)) == pytest.approx(0, abs=1e-9)
    # through the metric and a real embedder: the same audio as reference and as evaluated set
    audio, _ = make_clips(4, seconds=2.0, sample_rate=32000)
    fad = FrechetAudioDistance(VGGishEmbedder(tiny_vggish_path))
    fad.update(audio, 32000, real=True)
    fad.update(audio, 32000)
    assert float(fad.compute()) == pytest.approx(0, abs=1e-9)


def test_fad_matches_the_closed_form_and_scipy():
    # commuting (diagonal) covariances: FD = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2 exactly
    mu1, mu2 = (
        torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64),
        torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64),
    )
    s1, s2 = (
        torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64),
        torch.tensor([2.0, 1.0, 0.25], dtype=torch.float64),
    )
    closed = float(((mu1 - mu2) ** 2).sum() + ((s1.sqrt() - s2.sqrt()) ** 2).sum())
    assert float(frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))) == pytest.approx(
        closed, rel=1e-12
    )

    # two Gaussian embedding sets with full covariances: metric vs scipy.linalg.sqrtm on the same statistics
    dim = 8
    root_a = torch.randn(dim, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / 3
    root_b = torch.randn(dim, dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64) / 3
    real = gaussian(4000, torch.zeros(dim, dtype=torch.float64), root_a, seed=3)
    fake = gaussian(3000, torch.full((dim,), 0.3, dtype=torch.float64), root_b, seed=4)
    fad = FrechetAudioDistance(FrameStub(dim))
    fad.update_embeddings(real, real=True)
    fad.update_embeddings(fake)
    value = float(fad.compute())
    ra, fb = real.numpy(), fake.numpy()
    reference = scipy_frechet(ra.mean(0), np.cov(ra.T), fb.mean(0), np.cov(fb.T))
    assert value == pytest.approx(reference, rel=1e-8)
    # and the sample estimate is close to the population's closed-form value
    population = scipy_frechet(
        np.zeros(dim), (root_a @ root_a.T).numpy(), np.full(dim, 0.3), (root_b @ root_b.T).numpy()
    )
    assert value == pytest.approx(population, rel=0.1)


def test_fad_is_symmetric_and_independent_of_batching():
    a = gaussian(500, torch.zeros(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64), seed=0)
    b = gaussian(400, torch.ones(5, dtype=torch.float64), 0.5 * torch.eye(5, dtype=torch.float64), seed=1)
    sa, sb = EmbeddingStats.from_embeddings(a), EmbeddingStats.from_embeddings(b)
    forward = float(frechet_distance(sa.mean, sa.cov, sb.mean, sb.cov))
    backward = float(frechet_distance(sb.mean, sb.cov, sa.mean, sa.cov))
    assert forward == pytest.approx(backward, rel=1e-10)
    chunked = FrechetAudioDistance(FrameStub(5))
    for chunk in a.split(37):
        chunked.update_embeddings(chunk, real=True)
    for chunk in b.split(91):
        chunked.update_embeddings(chunk)
    assert float(chunked.compute()) == pytest.approx(forward, rel=1e-9)


def test_reference_statistics_file_round_trip(tmp_path, tiny_vggish_path, make_clips):
    embedder = VGGishEmbedder(tiny_vggish_path)
    reference, _ = make_clips(6, seconds=2.0, sample_rate=16000, seed=1)
    evaluated, _ = make_clips(5, seconds=2.5, sample_rate=32000, seed=2)
    direct = FrechetAudioDistance(embedder)
    direct.update(reference, 16000, real=True)
    direct.update(evaluated, 32000)
    path = save_stats(tmp_path / "ref.safetensors", {"vggish": direct.stats(real=True)})
    loaded = load_stats(path, "vggish")
    assert loaded.count == 12 and loaded.meta["clips"] == 6 and loaded.mean.dtype == torch.float64
    from_file = FrechetAudioDistance(embedder, reference_stats=path)
    from_file.update(evaluated, 32000)
    assert float(from_file.compute()) == pytest.approx(float(direct.compute()), rel=1e-9)
    summary = from_file.summary()
    assert summary["n_clips"] == 5 and summary["clip_seconds"] == pytest.approx(2.5)
    assert summary["embedder"]["name"] == "vggish" and summary["reference"]["n_frames"] == 12
    # a reference loaded from a file cannot also be fed audio
    with pytest.raises(FADError, match="precomputed reference statistics"):
        from_file.update(reference, 16000, real=True)


def test_statistics_file_errors_name_the_problem(tmp_path, tiny_vggish_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors.*does not exist"):
        load_stats(tmp_path / "missing.safetensors", "vggish")
    path = save_stats(
        tmp_path / "ref.safetensors", {"clap": EmbeddingStats.from_embeddings(torch.randn(10, 3))}
    )
    with pytest.raises(FADError, match="no statistics for embedder 'vggish'.*clap"):
        load_stats(path, "vggish")
    wrong_dim = save_stats(
        tmp_path / "dim.safetensors", {"vggish": EmbeddingStats.from_embeddings(torch.randn(10, 3))}
    )
    with pytest.raises(FADError, match="3-d embeddings.*12-d"):
        FrechetAudioDistance(VGGishEmbedder(tiny_vggish_path), reference_stats=wrong_dim)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FADError, match="cannot read FAD statistics"):
        load_stats(tmp_path / "junk.safetensors", "vggish")


def test_compute_without_audio_and_reset_keeping_the_reference():
    fad = FrechetAudioDistance(FrameStub(3), reset_real_features=False)
    with pytest.raises(FADError, match="reference .* set, got 0.*update"):
        fad.compute()
    fad.update_embeddings(torch.randn(50, 3, dtype=torch.float64), real=True)
    fad.update_embeddings(torch.randn(40, 3, dtype=torch.float64) + 1)
    first = float(fad.compute())
    fad.reset()
    assert int(fad.real_n) == 50 and int(fad.fake_n) == 0
    with pytest.raises(FADError, match="evaluated set, got 0"):
        fad.compute()
    with pytest.raises(FADError, match=r"\[N, 3\]"):
        fad.update_embeddings(torch.randn(4, 5))
    assert first > 0


def test_fad_infinity_removes_the_small_sample_bias():
    dim = 16
    reference = EmbeddingStats(
        torch.zeros(dim, dtype=torch.float64), torch.eye(dim, dtype=torch.float64), 10**6
    )
    frames = gaussian(
        2000, torch.zeros(dim, dtype=torch.float64), torch.eye(dim, dtype=torch.float64), seed=5
    )
    stats = EmbeddingStats.from_embeddings(frames)
    full = float(frechet_distance(stats.mean, stats.cov, reference.mean, reference.cov))
    result = fad_infinity(frames, reference, min_n=200, steps=10, seed=0)
    # same distribution: FAD_N > 0 only through the 1/N bias, which the intercept removes
    assert full > 0.03
    assert abs(result["fad_inf"]) < 0.5 * full
    assert result["slope"] > 0 and result["r2"] > 0.9
    assert result["n"][0] == 200 and result["n"][-1] == 2000

    metric = FrechetAudioDistance(
        FrameStub(dim), reference_stats=reference, fad_inf=True, inf_min_n=200, inf_steps=10
    )
    metric.update_embeddings(frames.float())
    summary = metric.summary()
    assert summary["fad_inf"]["fad_inf"] == pytest.approx(result["fad_inf"], rel=1e-4, abs=1e-6)
    with pytest.raises(FADError, match="fad_inf=True"):
        FrechetAudioDistance(FrameStub(dim), reference_stats=reference).compute_inf()
