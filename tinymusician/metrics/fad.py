"""Fréchet Audio Distance as a torchmetrics ``Metric``, reference statistics files and FAD-infinity.

FAD (Kilgour et al. 2019) fits a Gaussian to the embedding frames of a reference set and of an evaluated set
and reports the Fréchet distance between them:

    FAD = ||mu_r - mu_e||^2 + tr(S_r) + tr(S_e) - 2 tr((S_r S_e)^(1/2))

States are running sums in float64 (frame count, sum, sum of outer products), so a DDP sync is a plain sum
and the result does not depend on how clips were split over batches or processes.
"""

from __future__ import annotations

import json
import logging
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torchmetrics import Metric

from tinymusician.metrics.audio import AudioInput

if TYPE_CHECKING:
    from tinymusician.metrics.embedders import AudioEmbedder

log = logging.getLogger(__name__)

STATS_FORMAT = "tinymusician-fad-stats/1"


class FADError(ValueError):
    """FAD cannot be computed from what was given; the message says what is missing."""


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a (numerically) positive semi-definite matrix; tiny negative eigenvalues -> 0."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(
    mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor
) -> torch.Tensor:
    """Fréchet distance between N(mean1, cov1) and N(mean2, cov2), in float64.

    ``tr((S1 S2)^(1/2))`` is taken as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``): no complex parts to discard and no inverse, so
    singular covariances (fewer frames than dimensions) are fine.
    """
    mean1, mean2, cov1, cov2 = (t.double() for t in (mean1, mean2, cov1, cov2))
    if mean1.shape != mean2.shape or cov1.shape != cov2.shape:
        raise FADError(
            f"embedding dimensions differ: {tuple(mean1.shape)} vs {tuple(mean2.shape)}; the two sets must "
            "come from the same embedder"
        )
    root1 = psd_sqrt(cov1)
    inner = root1 @ cov2 @ root1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    diff = mean1 - mean2
    distance = diff.dot(diff) + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_covmean
    return distance.clamp_min(0)  # rounding can leave -1e-12 when the sets are identical


def mean_cov_from_sums(
    count: torch.Tensor, total: torch.Tensor, outer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance from ``n``, ``sum x`` and ``sum x x^T``."""
    n = float(count)
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
    return mean, (cov + cov.T) / 2


@dataclass
class EmbeddingStats:
    """Gaussian statistics of one set's embedding frames: mean ``[D]``, covariance ``[D, D]`` (float64)."""

    mean: torch.Tensor
    cov: torch.Tensor
    count: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_embeddings(cls, frames: torch.Tensor, meta: dict[str, Any] | None = None) -> EmbeddingStats:
        frames = frames.double()
        if frames.dim() != 2 or frames.shape[0] < 2:
            raise FADError(f"statistics need >= 2 embedding frames [N, D], got shape {tuple(frames.shape)}")
        mean = frames.mean(dim=0)
        cov = torch.cov(frames.T).reshape(frames.shape[1], frames.shape[1])
        return cls(mean, cov, int(frames.shape[0]), dict(meta or {}))


def save_stats(path: str | Path, stats: dict[str, EmbeddingStats]) -> Path:
    """Write reference statistics (one entry per embedder name) to a safetensors file.

    Tensors ``{name}.mean`` / ``{name}.cov``; metadata holds the frame count and a description of the embedder
    and the reference set, so a later FAD can check it compares like with like.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, metadata = {}, {"format": STATS_FORMAT}
    for name, entry in stats.items():
        tensors[f"{name}.mean"] = entry.mean.double().contiguous()
        tensors[f"{name}.cov"] = entry.cov.double().contiguous()
        metadata[name] = json.dumps({"count": entry.count, **entry.meta}, default=str)
    save_file(tensors, str(path), metadata=metadata)
    return path


def stats_entries(path: str | Path) -> list[str]:
    """Embedder names stored in a statistics file."""
    path = _existing_stats_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return sorted(key for key in (handle.metadata() or {}) if key != "format")
    except (OSError, SafetensorError) as err:
        raise FADError(f"cannot read FAD statistics from {str(path)!r}: {err}") from err


def load_stats(path: str | Path, name: str) -> EmbeddingStats:
    """Read the entry for embedder ``name`` from a file written by :func:`save_stats` (data only, no code)."""
    path = _existing_stats_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != STATS_FORMAT:
                raise FADError(
                    f"{str(path)!r} is not a FAD statistics file (format {metadata.get('format')!r}, "
                    f"expected {STATS_FORMAT!r}); write one with `python -m tinymusician.evaluate --save-stats`"
                )
            if name not in metadata:
                known = sorted(key for key in metadata if key != "format")
                raise FADError(f"{str(path)!r} has no statistics for embedder {name!r}; it holds {known}")
            mean, cov = handle.get_tensor(f"{name}.mean"), handle.get_tensor(f"{name}.cov")
    except (OSError, SafetensorError) as err:
        raise FADError(f"cannot read FAD statistics from {str(path)!r}: {err}") from err
    meta = json.loads(metadata[name])
    count = int(meta.pop("count"))
    return EmbeddingStats(mean.double(), cov.double(), count, meta)


def _existing_stats_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"FAD reference statistics file {str(path)!r} does not exist; create it with "
            "`python -m tinymusician.evaluate --reference REF_WAV_DIR --save-stats FILE`"
        )
    return path


def fad_infinity(
    frames: torch.Tensor,
    reference: EmbeddingStats,
    *,
    min_n: int | None = None,
    steps: int = 25,
    seed: int = 0,
) -> dict[str, Any]:
    """FAD-inf (Gui et al. 2024): FAD of random subsets of ``n`` evaluated frames against the reference,
    a least-squares line of FAD over ``1/n``, and its intercept (the FAD of an infinite evaluation set).

    ``n`` runs over ``steps`` values from ``min_n`` (default ``min(500, N // 2)``) to all ``N`` frames.
    Returns the intercept, slope, R^2 of the fit and the points it was fitted on.
    """
    total = int(frames.shape[0])
    min_n = min(500, total // 2) if min_n is None else min_n
    min_n = max(2, min(int(min_n), total))
    sizes = sorted({int(round(n)) for n in torch.linspace(min_n, total, steps).tolist()})
    if len(sizes) < 2:
        raise FADError(f"FAD-inf needs at least 4 evaluated embedding frames to fit a line, got {total}")
    generator = torch.Generator().manual_seed(seed)
    values = []
    for n in sizes:
        subset = frames[torch.randperm(total, generator=generator)[:n]].double()
        stats = EmbeddingStats.from_embeddings(subset)
        values.append(float(frechet_distance(stats.mean, stats.cov, reference.mean, reference.cov)))
    x = torch.tensor([1.0 / n for n in sizes], dtype=torch.float64)
    y = torch.tensor(values, dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1)
    intercept, slope = torch.linalg.lstsq(design, y[:, None]).solution[:, 0].tolist()
    residual = y - (intercept + slope * x)
    spread = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - float((residual**2).sum() / spread) if spread > 0 else 1.0
    return {"fad_inf": intercept, "slope": slope, "r2": r2, "n": sizes, "fad": values}


class FrechetAudioDistance(Metric):
    """FAD between generated audio and a reference set, in the feature space of a pluggable embedder.

    ``update(audio, sample_rate, real=False)`` embeds waveforms (any rate, mono or multi-channel; see
    :func:`tinymusician.metrics.audio.split_clips`) and accumulates their frames; ``real=True`` feeds the
    reference set. Alternatively ``reference_stats`` (a file from :func:`save_stats` or an
    :class:`EmbeddingStats`) stands for the reference, so it is embedded only once.

    Args:
        embedder: an :class:`~tinymusician.metrics.embedders.AudioEmbedder` or a registry name
            (``clap``, ``encodec``, ``vggish``) built with ``embedder_kwargs``.
        reference_stats: precomputed reference statistics (path or object) instead of ``real=True`` updates.
        reset_real_features: if False, ``reset()`` keeps the reference frames (embed once, score many models).
        fad_inf: also keep every evaluated frame, so :meth:`compute_inf` can extrapolate FAD-infinity.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        embedder: AudioEmbedder | str,
        *,
        embedder_kwargs: dict[str, Any] | None = None,
        reference_stats: str | Path | EmbeddingStats | None = None,
        reset_real_features: bool = True,
        fad_inf: bool = False,
        inf_min_n: int | None = None,
        inf_steps: int = 25,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(embedder, str):
            from tinymusician.metrics.embedders import build_embedder

            embedder = build_embedder(embedder, **(embedder_kwargs or {}))
        # A plain attribute (embedders are not nn.Modules): the embedding model never enters a state_dict.
        self.embedder = embedder
        dim = int(embedder.dim)
        self.reset_real_features = reset_real_features
        self.fad_inf, self.inf_min_n, self.inf_steps, self.seed = fad_inf, inf_min_n, inf_steps, seed
        for prefix in ("real", "fake"):
            self.add_state(f"{prefix}_n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{prefix}_sum", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(
                f"{prefix}_outer", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum"
            )
            self.add_state(f"{prefix}_clips", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{prefix}_seconds", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        if fad_inf:
            self.add_state("fake_frames", [], dist_reduce_fx="cat")
        self.reference: EmbeddingStats | None = None
        if reference_stats is not None:
            self.reference = (
                reference_stats
                if isinstance(reference_stats, EmbeddingStats)
                else load_stats(reference_stats, embedder.name)
            )
            self._check_reference(self.reference, str(reference_stats))

    def _check_reference(self, reference: EmbeddingStats, where: str) -> None:
        if reference.dim != self.embedder.dim:
            raise FADError(
                f"reference statistics {where} have {reference.dim}-d embeddings but the {self.embedder.name} "
                f"embedder gives {self.embedder.dim}-d ones; recompute them with this embedder"
            )
        saved = reference.meta.get("embedder", {})
        mine = self.embedder.describe()
        differs = {
            k: (saved[k], mine[k])
            for k in ("source", "sample_rate")
            if k in saved and saved[k] != mine.get(k)
        }
        if differs:
            log.warning("Reference statistics %s were computed with a different embedder: %s", where, differs)
        if reference.count < 2:
            raise FADError(f"reference statistics {where} come from {reference.count} frame(s); need >= 2")

    # --- updates ----------------------------------------------------------------------------------------
    def update(
        self,
        audio: AudioInput | None = None,
        sample_rate: int | None = None,
        real: bool = False,
        *,
        embeddings: torch.Tensor | None = None,
    ) -> None:
        """Embed clips and add their frames to the reference (``real=True``) or evaluated set.

        ``embeddings=[N, D]`` adds precomputed frames instead of audio (see :meth:`update_embeddings`).
        """
        if embeddings is not None:
            if embeddings.dim() != 2 or embeddings.shape[1] != self.embedder.dim:
                raise FADError(f"embeddings must be [N, {self.embedder.dim}], got {tuple(embeddings.shape)}")
            self._add(embeddings, real=real, clips=embeddings.shape[0], seconds=0.0)
            return
        if audio is None or sample_rate is None:
            raise FADError("update() needs audio and its sample_rate (or embeddings=...)")
        frames = self.embedder.embed(audio, sample_rate)
        seconds = sum(self._clip_seconds(audio, sample_rate))
        self._add(torch.cat(frames), real=real, clips=len(frames), seconds=seconds)

    def update_embeddings(self, frames: torch.Tensor, real: bool = False) -> None:
        """Add precomputed embedding frames ``[N, D]`` (e.g. from :meth:`AudioEmbedder.embed`)."""
        self.update(embeddings=frames, real=real)

    @staticmethod
    def _clip_seconds(audio: AudioInput, sample_rate: int) -> list[float]:
        from tinymusician.metrics.audio import split_clips

        return [clip.shape[-1] / sample_rate for clip in split_clips(audio)]

    def _add(self, frames: torch.Tensor, *, real: bool, clips: int, seconds: float) -> None:
        if real and self.reference is not None:
            raise FADError(
                "this FAD compares against precomputed reference statistics; real=True updates are not used. "
                "Drop reference_stats to embed a reference set instead."
            )
        if not torch.isfinite(frames).all():
            raise FADError(f"the {self.embedder.name} embedder returned NaN/inf embeddings")
        frames = frames.to(self.device, torch.float64)
        prefix = "real" if real else "fake"
        setattr(self, f"{prefix}_n", getattr(self, f"{prefix}_n") + frames.shape[0])
        setattr(self, f"{prefix}_sum", getattr(self, f"{prefix}_sum") + frames.sum(dim=0))
        setattr(self, f"{prefix}_outer", getattr(self, f"{prefix}_outer") + frames.T @ frames)
        setattr(self, f"{prefix}_clips", getattr(self, f"{prefix}_clips") + clips)
        setattr(self, f"{prefix}_seconds", getattr(self, f"{prefix}_seconds") + seconds)
        if self.fad_inf and not real:
            self.fake_frames.append(frames.float())

    # --- results ----------------------------------------------------------------------------------------
    def _stats(self, real: bool) -> EmbeddingStats:
        if real and self.reference is not None:
            return self.reference
        prefix = "real" if real else "fake"
        count = getattr(self, f"{prefix}_n")
        if count < 2:
            which = "reference (real=True)" if real else "evaluated"
            raise FADError(
                f"FAD needs >= 2 embedding frames in the {which} set, got {int(count)}; call update() with audio"
            )
        mean, cov = mean_cov_from_sums(
            count, getattr(self, f"{prefix}_sum"), getattr(self, f"{prefix}_outer")
        )
        meta = {
            "embedder": self.embedder.describe(),
            "clips": int(getattr(self, f"{prefix}_clips")),
            "seconds": float(getattr(self, f"{prefix}_seconds")),
        }
        return EmbeddingStats(mean, cov, int(count), meta)

    def compute(self) -> torch.Tensor:
        real, fake = self._stats(real=True), self._stats(real=False)
        return frechet_distance(fake.mean, fake.cov, real.mean, real.cov)

    def stats(self, real: bool = True) -> EmbeddingStats:
        """Statistics of the (synced) reference or evaluated set, e.g. to :func:`save_stats` them."""
        with self.sync_context(should_unsync=True):
            return self._stats(real)

    def compute_inf(self) -> dict[str, Any]:
        """FAD-infinity of the evaluated set (needs ``fad_inf=True``); see :func:`fad_infinity`."""
        if not self.fad_inf:
            raise FADError("FAD-inf needs the evaluated frames: construct the metric with fad_inf=True")
        with self.sync_context(should_unsync=True):
            frames = self.fake_frames
            frames = torch.cat(frames) if isinstance(frames, list) and frames else frames
            if isinstance(frames, list) or frames.numel() == 0:
                raise FADError("FAD-inf: no evaluated audio; call update() first")
            return fad_infinity(
                frames, self._stats(real=True), min_n=self.inf_min_n, steps=self.inf_steps, seed=self.seed
            )

    def summary(self) -> dict[str, Any]:
        """FAD with what it was measured on: N frames/clips, clip length, embedder, reference set."""
        with self.sync_context(should_unsync=True):
            real, fake = self._stats(real=True), self._stats(real=False)
        value = float(frechet_distance(fake.mean, fake.cov, real.mean, real.cov))
        result: dict[str, Any] = {
            "fad": value,
            "embedder": self.embedder.describe(),
            "n_frames": fake.count,
            "n_clips": fake.meta["clips"],
            "clip_seconds": fake.meta["seconds"] / max(fake.meta["clips"], 1),
            "reference": {
                "n_frames": real.count,
                **{k: v for k, v in real.meta.items() if k != "embedder"},
            },
        }
        if real.count <= real.dim or fake.count <= fake.dim:
            result["warning"] = (
                f"fewer frames than embedding dimensions ({fake.count} evaluated, {real.count} reference, "
                f"{fake.dim}-d): covariances are singular and FAD is biased upwards"
            )
        if self.fad_inf:
            result["fad_inf"] = self.compute_inf()
        return result

    def reset(self) -> None:
        if self.reset_real_features:
            super().reset()
            return
        kept = {name: deepcopy(getattr(self, name)) for name in self._defaults if name.startswith("real_")}
        super().reset()
        for name, value in kept.items():
            setattr(self, name, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(embedder={self.embedder.name}, dim={self.embedder.dim})"
