"""Train the tiny world's codec: a small transformers ``EncodecModel`` (16 kHz, 50 Hz frames, 4 x 256 codes).

Recipe (found in a feasibility study, numbers in the world report): He re-initialisation of the weight-normed
convolutions (transformers' ``_init_weights`` misses them), an output-gain calibration, an autoencoder warm-up,
then residual VQ with k-means initialisation, EMA codebooks, dead-code restarts and straight-through
gradients. Loss: waveform L1 (x10) + commitment + a latent regulariser (per-channel zero mean, unit variance,
which keeps the Euclidean VQ from mapping every frame to one code); the multi-scale log-mel term joins only
after ``spectral_after`` steps, because from the start it pulls the decoder into a silent plateau. Batches mix
corpus crops with sustained tones and sweeps at continuous pitches, so the codec keeps pitch off the corpus's
note grid. Steps, not wall time, bound the run: the same recipe gives the same codec.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import EncodecConfig, EncodecModel

from tinymusician.data import synthetic
from tinymusician.zoo.tiny import codec_config

SAMPLE_RATE = 16000
TONE_INSTRUMENTS = ("sine", "flute", "organ", "guitar", "synth", "bell")
# Held-out pitch probes: sustained tones across the registers, off the corpus's equal-tempered grid.
PITCH_PROBES = (
    ("sine", 98.0),
    ("organ", 123.0),
    ("guitar", 185.0),
    ("flute", 262.0),
    ("synth", 350.0),
    ("organ", 590.0),
    ("flute", 940.0),
)


@dataclass(frozen=True)
class CodecRecipe:
    ratios: tuple[int, ...] = (8, 5, 4, 2)  # hop 320: 50 frames/s at 16 kHz, like MusicGen's codes
    num_filters: int = 8
    hidden_size: int = 64
    codebook_size: int = 256
    num_codebooks: int = 4
    steps: int = 1100
    batch_size: int = 8
    crop_seconds: float = 0.5
    corpus_clips: int = 512
    corpus_seed: int = 0
    tone_fraction: float = 0.5
    sweep_probability: float = 0.4
    lr: float = 1e-3
    encoder_lr_factor: float = 0.3  # once quantizing: the latents must not run away from the codebooks
    autoencoder_steps: int = 250  # before k-means: no quantizer
    spectral_after: int = 300
    ema_decay: float = 0.9
    dead_code_threshold: float = 0.1
    weight_l1: float = 10.0
    weight_mel: float = 1.0
    mel_floor: float = 1e-3
    seed: int = 0

    def config(self) -> EncodecConfig:
        return codec_config(
            SAMPLE_RATE,
            self.codebook_size,
            self.num_codebooks,
            ratios=self.ratios,
            num_filters=self.num_filters,
            hidden_size=self.hidden_size,
            causal=False,
        )


# --- audio the codec trains and is probed on ------------------------------------------------------------
def render_tone(
    rng: np.random.Generator,
    n: int,
    instrument: str,
    f0: float,
    f1: float | None = None,
    vibrato: float = 0.0,
    onset: int = 0,
    attack: float = 0.01,
    release_at: int | None = None,
    peak: float = 0.8,
) -> np.ndarray:
    """One note with the corpus's timbres, optionally gliding exponentially f0 -> f1 over the clip."""
    t_abs = np.arange(n) / SAMPLE_RATE
    freq = np.full(n, f0) if f1 is None else f0 * (f1 / f0) ** (t_abs / t_abs[-1])
    if vibrato > 0:
        freq = freq * (1.0 + vibrato * np.sin(2 * np.pi * rng.uniform(4, 6.5) * t_abs + rng.uniform(0, 6.3)))
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE + rng.uniform(0, 2 * np.pi)
    t = np.clip((np.arange(n) - onset) / SAMPLE_RATE, 0.0, None)
    nyquist_margin = 0.45 * SAMPLE_RATE
    wave = np.zeros(n)
    if instrument == "bell":
        partials = zip(synthetic._BELL_RATIOS, synthetic._BELL_AMPS, synthetic._BELL_DECAYS, strict=True)
        for ratio, amp, decay in partials:
            wave += amp * (ratio * freq < nyquist_margin) * np.exp(-decay * 0.5 * t) * np.sin(ratio * phase)
    else:
        amps, base, per = (
            (np.array([1.0]), 0.0, 0.0) if instrument == "sine" else synthetic._HARMONIC_TIMBRES[instrument]
        )
        for k, amp in enumerate(amps, start=1):
            if amp:
                decay = np.exp(-(base + per * k) * 0.5 * t)
                wave += amp * (k * freq < nyquist_margin) * decay * np.sin(k * phase)
    envelope = np.clip(t / max(attack, 1e-4), 0.0, 1.0) * (np.arange(n) >= onset)
    if release_at is not None:
        envelope *= np.clip((release_at - np.arange(n)) / (0.015 * SAMPLE_RATE), 0.0, 1.0)
    audio = envelope * wave
    if instrument == "flute":
        audio += 0.03 * envelope * rng.standard_normal(n)
    peak_now = np.max(np.abs(audio))
    return (audio * (peak / peak_now) if peak_now > 0 else audio).astype(np.float32)


def random_tone(rng: np.random.Generator, n: int, sweep_probability: float) -> np.ndarray:
    """A sustained tone or sweep at a continuous pitch (62-1700 Hz), random onset, release and loudness."""
    instrument = TONE_INSTRUMENTS[rng.integers(len(TONE_INSTRUMENTS))]
    f0 = math.exp(rng.uniform(math.log(62), math.log(1700)))
    f1 = (
        float(np.clip(f0 * 2 ** rng.uniform(-1.5, 1.5), 55, 1900))
        if rng.random() < sweep_probability
        else None
    )
    vibrato = rng.uniform(0.002, 0.01) if rng.random() < 0.3 else 0.0
    onset = int(rng.integers(0, n // 3)) if rng.random() < 0.5 else 0
    release = int(rng.integers(n // 2, n)) if rng.random() < 0.3 else None
    peak = rng.uniform(0.1, 0.95)
    return render_tone(rng, n, instrument, f0, f1, vibrato, onset, rng.uniform(0.002, 0.05), release, peak)


def pitch_probes() -> list[tuple[str, float, np.ndarray]]:
    """(instrument, f0, 1 s of audio) for the held-out pitch test."""
    rng = np.random.default_rng(424242)
    return [
        (
            name,
            f0,
            render_tone(rng, SAMPLE_RATE, name, f0, attack=0.02, release_at=SAMPLE_RATE - 200, peak=0.6),
        )
        for name, f0 in PITCH_PROBES
    ]


class Batches:
    """Training crops: corpus clips (random gain) mixed with random tones and sweeps."""

    def __init__(self, recipe: CodecRecipe) -> None:
        self.recipe = recipe
        self.rng = np.random.default_rng([recipe.seed, 17])
        self.n = int(recipe.crop_seconds * SAMPLE_RATE)
        clips = synthetic.synthesize_corpus(
            recipe.corpus_clips, seed=recipe.corpus_seed, seconds=2.0, sample_rate=SAMPLE_RATE
        )
        self.corpus = np.stack([clip.audio for clip in clips])

    def __call__(self) -> torch.Tensor:
        out = np.zeros((self.recipe.batch_size, self.n), dtype=np.float32)
        for row in out:
            if self.rng.random() < self.recipe.tone_fraction:
                row[:] = random_tone(self.rng, self.n, self.recipe.sweep_probability)
            else:
                clip = self.corpus[self.rng.integers(len(self.corpus))]
                start = self.rng.integers(0, clip.shape[0] - self.n + 1)
                row[:] = clip[start : start + self.n] * self.rng.uniform(0.5, 1.2)
        return torch.from_numpy(np.clip(out, -1, 1))


# --- spectra and measurements ---------------------------------------------------------------------------
_MEL_BANKS: dict[tuple[int, int], torch.Tensor] = {}


def mel_filterbank(n_fft: int, n_mels: int) -> torch.Tensor:
    """``[n_fft // 2 + 1, n_mels]`` HTK mel triangles over 0 .. Nyquist."""
    if (n_fft, n_mels) not in _MEL_BANKS:

        def to_mel(f: np.ndarray) -> np.ndarray:
            return 2595.0 * np.log10(1.0 + f / 700.0)

        freqs = np.linspace(0, SAMPLE_RATE / 2, n_fft // 2 + 1)
        edges = 700.0 * (10 ** (np.linspace(0, to_mel(np.array(SAMPLE_RATE / 2)), n_mels + 2) / 2595.0) - 1.0)
        lo, centre, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
        bank = np.maximum(0, np.minimum((freqs - lo) / (centre - lo), (hi - freqs) / (hi - centre)))
        _MEL_BANKS[(n_fft, n_mels)] = torch.tensor(bank.T, dtype=torch.float32)
    return _MEL_BANKS[(n_fft, n_mels)]


def log_mel(audio: torch.Tensor, n_fft: int, n_mels: int, floor: float = 1e-5) -> torch.Tensor:
    """``[B, samples]`` -> ``[B, n_mels, frames]`` log mel magnitude (hop n_fft / 4)."""
    window = torch.hann_window(n_fft)
    magnitude = torch.stft(audio, n_fft, n_fft // 4, window=window, return_complex=True).abs()
    return torch.log(torch.einsum("bft,fm->bmt", magnitude, mel_filterbank(n_fft, n_mels)) + floor)


def mel_distance(reference: torch.Tensor, audio: torch.Tensor) -> float:
    """Mean |log-mel difference| (n_fft 1024, hop 256, 64 mels, floor 1e-5): the codec's headline error."""
    return float((log_mel(reference, 1024, 64) - log_mel(audio, 1024, 64)).abs().mean())


def yin_f0(audio: np.ndarray, fmin: float = 60.0, fmax: float = 1500.0, window: int = 1024) -> float:
    """Median YIN fundamental (threshold 0.15) over the middle 60% of a clip, frames every 256 samples."""
    tau_min, tau_max = int(SAMPLE_RATE / fmax), int(SAMPLE_RATE / fmin)
    middle = audio[int(0.2 * len(audio)) : int(0.8 * len(audio))].astype(np.float64)
    estimates = []
    for start in range(0, len(middle) - window - tau_max, 256):
        frame = middle[start : start + window + tau_max]
        diff = np.array(
            [np.sum((frame[:window] - frame[tau : tau + window]) ** 2) for tau in range(tau_max + 1)]
        )
        cmnd = np.ones_like(diff)
        cmnd[1:] = diff[1:] * np.arange(1, tau_max + 1) / np.maximum(np.cumsum(diff[1:]), 1e-12)
        below = np.nonzero(cmnd[tau_min:] < 0.15)[0]
        if len(below):
            tau = tau_min + below[0]
            while tau + 1 <= tau_max and cmnd[tau + 1] < cmnd[tau]:
                tau += 1
        else:
            tau = tau_min + int(np.argmin(cmnd[tau_min:]))
        shift = 0.0
        if 1 <= tau < tau_max:
            a, b, c = cmnd[tau - 1], cmnd[tau], cmnd[tau + 1]
            shift = 0.5 * (a - c) / (a - 2 * b + c) if abs(a - 2 * b + c) > 1e-12 else 0.0
        estimates.append(SAMPLE_RATE / (tau + shift))
    return float(np.median(estimates))


@torch.inference_mode()
def reconstruct(codec: EncodecModel, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Through the public path: ``[B, samples]`` -> (codes ``[B, K, T]``, audio ``[B, samples]``)."""
    encoded = codec.encode(audio[:, None, :])
    decoded = codec.decode(encoded.audio_codes, encoded.audio_scales)[0]
    return encoded.audio_codes[0], decoded[:, 0, : audio.shape[-1]]


@torch.inference_mode()
def evaluate_codec(codec: EncodecModel, heldout: torch.Tensor) -> dict:
    """Mel distance, SNR and per-codebook code usage on held-out clips; pitch of the probe tones."""
    codec.eval()
    pieces = [reconstruct(codec, chunk) for chunk in heldout.split(16)]
    codes, decoded = torch.cat([c for c, _ in pieces]), torch.cat([r for _, r in pieces])
    usage = [int(torch.unique(codes[:, k]).numel()) for k in range(codes.shape[1])]
    error = (heldout - decoded).pow(2).sum().clamp_min(1e-12)
    tones = []
    for name, f0, audio in pitch_probes():
        estimate = yin_f0(reconstruct(codec, torch.from_numpy(audio)[None])[1][0].numpy())
        semitones = 12 * math.log2(max(estimate, 1e-3) / f0)
        tones.append(
            {"instrument": name, "f0": f0, "estimate": round(estimate, 1), "semitones": round(semitones, 2)}
        )
    return {
        "n_clips": len(heldout),
        "mel_distance": mel_distance(heldout, decoded),
        "snr_db": float(10 * torch.log10(heldout.pow(2).sum() / error)),
        "code_usage": usage,
        "min_code_usage": min(usage) / codec.config.codebook_size,
        "tones_within_semitone": sum(abs(t["semitones"]) <= 1.0 for t in tones),
        "tones": tones,
    }


# --- the model --------------------------------------------------------------------------------------------
def weight_normed_convs(codec: EncodecModel) -> list[torch.nn.Module]:
    return [
        module.conv
        for module in codec.modules()
        if isinstance(getattr(module, "conv", None), (torch.nn.Conv1d, torch.nn.ConvTranspose1d))
        and hasattr(module.conv, "parametrizations")
    ]


@torch.no_grad()
def reinit_convs(codec: EncodecModel, generator: torch.Generator) -> None:
    """He init of every weight-normed conv. transformers' ``_init_weights`` initialises ``conv.weight``, which
    under weight norm is computed, so the real parameters keep a gain of 1/sqrt(3): through ~16 layers the
    signal and the encoder's gradient vanish and training sits at silence."""
    for conv in weight_normed_convs(codec):
        direction = conv.parametrizations.weight.original1
        fan_in = direction.shape[1] * direction.shape[2]
        if isinstance(conv, torch.nn.ConvTranspose1d):
            fan_in = direction.shape[0] * direction.shape[2] / conv.stride[0]
        weight = torch.randn(direction.shape, generator=generator) * math.sqrt(1.0 / fan_in)
        direction.copy_(weight)
        gain = conv.parametrizations.weight.original0
        gain.copy_(
            weight.pow(2).sum(dim=tuple(range(1, weight.dim())), keepdim=True).sqrt().reshape(gain.shape)
        )
        if conv.bias is not None:
            conv.bias.zero_()


@torch.no_grad()
def calibrate_gain(codec: EncodecModel, audio: torch.Tensor) -> None:
    """Output std = input std, the correction spread geometrically over every conv's weight-norm gain."""
    gains = [conv.parametrizations.weight.original0 for conv in weight_normed_convs(codec)]
    for _ in range(4):
        out = codec.decoder(codec.encoder(audio[:, None]))[:, 0]
        factor = float(audio.std() / out.std().clamp_min(1e-8)) ** (1.0 / len(gains))
        for gain in gains:
            gain.mul_(factor)


class ResidualVQ:
    """Training-time residual VQ over the model's own codebook buffers (so ``save_pretrained`` keeps them)."""

    def __init__(self, codec: EncodecModel, decay: float, dead_threshold: float, generator: torch.Generator):
        self.books = [layer.codebook for layer in codec.quantizer.layers]
        self.decay, self.dead, self.generator, self.eps = decay, dead_threshold, generator, 1e-5

    @torch.no_grad()
    def kmeans_init(self, latents: torch.Tensor, batches: int, iterations: int = 10) -> None:
        """``latents [N, D]``: each book k-means-fitted to the residual the previous books leave."""
        residual = latents
        for book in self.books:
            size = book.embed.shape[0]
            centroids = residual[torch.randperm(len(residual), generator=self.generator)[:size]].clone()
            for _ in range(iterations):
                assign = torch.cdist(residual, centroids).argmin(1)
                counts = torch.bincount(assign, minlength=size).float()
                sums = torch.zeros_like(centroids).index_add_(0, assign, residual)
                empty = counts == 0
                centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
                if empty.any():
                    picks = torch.randint(len(residual), (int(empty.sum()),), generator=self.generator)
                    centroids[empty] = residual[picks]
            assign = torch.cdist(residual, centroids).argmin(1)
            book.embed.copy_(centroids)
            book.cluster_size.copy_(torch.bincount(assign, minlength=size).float() / batches)
            book.embed_avg.copy_(centroids * book.cluster_size[:, None])
            residual = residual - centroids[assign]

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z [B, D, T]`` -> (straight-through quantized latents, commitment loss); updates the codebooks."""
        batch, dim, frames = z.shape
        flat = z.permute(0, 2, 1).reshape(-1, dim)
        residual, total = flat, torch.zeros_like(flat)
        commitment = flat.new_zeros(())
        scale = flat.detach().var().clamp_min(1e-8)  # relative: the encoder's output scale is free
        for book in self.books:
            target = residual.detach()
            index = torch.cdist(target, book.embed).argmin(1)
            quantized = book.embed[index]
            commitment = commitment + F.mse_loss(residual, quantized.detach()) / scale
            self._ema(book, target, index)
            total = total + quantized
            residual = residual - quantized.detach()
        out = flat + (total - flat).detach()
        return out.reshape(batch, frames, dim).permute(0, 2, 1), commitment

    @torch.no_grad()
    def _ema(self, book: torch.nn.Module, x: torch.Tensor, index: torch.Tensor) -> None:
        size = book.embed.shape[0]
        book.cluster_size.mul_(self.decay).add_(
            torch.bincount(index, minlength=size).float(), alpha=1 - self.decay
        )
        sums = torch.zeros_like(book.embed).index_add_(0, index, x)
        book.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = book.cluster_size.sum()
        smoothed = (book.cluster_size + self.eps) / (total + size * self.eps) * total
        book.embed.copy_(book.embed_avg / smoothed[:, None])
        dead = book.cluster_size < self.dead
        if dead.any():  # restart dead codes on current residuals, slightly jittered
            picks = x[torch.randint(len(x), (int(dead.sum()),), generator=self.generator)]
            picks = picks + 0.01 * picks.std() * torch.randn(picks.shape, generator=self.generator)
            book.embed[dead] = picks
            book.cluster_size[dead] = 2 * self.dead
            book.embed_avg[dead] = picks * 2 * self.dead


def reconstruction_losses(
    x: torch.Tensor, y: torch.Tensor, floor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(waveform L1, multi-scale log-mel L1 over four resolutions)."""
    scales = ((256, 32), (512, 64), (1024, 64), (2048, 128))
    mel = sum((log_mel(x, n, m, floor) - log_mel(y, n, m, floor)).abs().mean() for n, m in scales)
    return F.l1_loss(y, x), mel / len(scales)


def untrained_codec(recipe: CodecRecipe) -> EncodecModel:
    """What the world replaces: transformers' init, codebooks k-means-fitted to its random encoder's latents."""
    torch.manual_seed(recipe.seed)
    codec = EncodecModel(recipe.config()).eval()
    audio = Batches(recipe)()  # a second Batches(recipe) would render the same corpus and draw the same batch
    with torch.no_grad():
        z = codec.encoder(torch.cat([audio, audio])[:, None])
    ResidualVQ(codec, recipe.ema_decay, 0.0, torch.Generator().manual_seed(recipe.seed)).kmeans_init(
        z.permute(0, 2, 1).reshape(-1, z.shape[1]), 1
    )
    return codec


def train_codec(recipe: CodecRecipe, on_step: Callable[[int, dict], None] | None = None) -> EncodecModel:
    """The trained codec (eval mode). ``on_step(step, losses)`` is called every step (progress, curves)."""
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    codec = EncodecModel(recipe.config())
    reinit_convs(codec, generator)
    codec.train()
    vq = ResidualVQ(codec, recipe.ema_decay, recipe.dead_code_threshold, generator)
    batches = Batches(recipe)
    calibrate_gain(codec, torch.cat([batches() for _ in range(4)]))
    optimizer = torch.optim.Adam(
        [{"params": list(codec.encoder.parameters())}, {"params": list(codec.decoder.parameters())}],
        lr=recipe.lr,
        betas=(0.8, 0.99),
    )
    quantizing = False
    for step in range(recipe.steps):
        if step == recipe.autoencoder_steps:
            with torch.no_grad():
                z = codec.encoder(torch.cat([batches() for _ in range(8)])[:, None])
            vq.kmeans_init(z.permute(0, 2, 1).reshape(-1, z.shape[1]), 8)
            quantizing = True
        warmup = min(1.0, (step + 1) / 50)
        cosine = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        for index, group in enumerate(optimizer.param_groups):
            slow = recipe.encoder_lr_factor if index == 0 and quantizing else 1.0
            group["lr"] = recipe.lr * slow * warmup * cosine
        x = batches()
        z = codec.encoder(x[:, None])
        mean, std = z.mean(dim=(0, 2)), z.std(dim=(0, 2))
        latent = mean.pow(2).mean() + torch.log(std.clamp_min(1e-6)).pow(2).mean()
        commitment = z.new_zeros(())
        if quantizing:
            z, commitment = vq(z)
        y = codec.decoder(z)[:, 0, : x.shape[-1]]
        l1, mel = reconstruction_losses(x, y, recipe.mel_floor)
        spectral = recipe.weight_mel if step >= recipe.spectral_after else 0.0
        loss = recipe.weight_l1 * l1 + spectral * mel + commitment + latent
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
        optimizer.step()
        if on_step is not None:
            on_step(
                step,
                {"loss": loss.item(), "l1": l1.item(), "mel": mel.item(), "commitment": commitment.item()},
            )
    return codec.eval()
