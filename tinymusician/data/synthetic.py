"""Seeded synthetic music clips whose captions describe them: the offline corpus and its datamodule.

Each clip is a short monophonic melody (opening on the tonic triad) whose instrument, tempo, register,
loudness and mode are drawn at random and all named in its caption, so a tiny text-conditioned model has real
caption -> audio structure to learn without downloading anything. ``heldout_clips`` is the evaluation set. :class:`SyntheticDataModule` (``data=synthetic``, the default)
serves the corpus through the token cache like any other dataset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from tinymusician.data.datamodule import CodesDataModule, EmptySplitError
from tinymusician.data.listing import ClipRef, Listing

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "instrument": ("flute", "organ", "guitar", "bell", "synth"),
    "tempo": ("slow", "moderate", "fast"),
    "register": ("low", "mid", "high"),
    "loudness": ("quiet", "loud"),
    "mode": ("major", "minor"),
}

_BPM = {"slow": 70.0, "moderate": 110.0, "fast": 150.0}
# Tonics an octave apart (A2, A3, A4) so the registers are far enough apart to hear and to measure.
_TONIC_MIDI = {"low": 45, "mid": 57, "high": 69}
_PEAK_RANGE = {"quiet": (0.2, 0.3), "loud": (0.8, 0.95)}
_SCALES = {"major": np.array([0, 2, 4, 5, 7, 9, 11]), "minor": np.array([0, 2, 3, 5, 7, 8, 10])}
# Motif rhythms in eighth notes; each fills half a bar so phrases stay on the beat grid.
_MOTIF_RHYTHMS = ((1, 1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 1))
_LOWEST_DEGREE, _HIGHEST_DEGREE = -2, 9

_ATTACK_S = {"flute": 0.03, "organ": 0.01, "guitar": 0.003, "bell": 0.002, "synth": 0.008}
_RELEASE_S = 0.015
_END_FADE_S = 0.01
_MIN_SECONDS = 0.1

# Harmonic amplitudes (k = 1, 2, ...) and per-second decay `base + per_harmonic * k` (0 = sustained).
_HARMONIC_TIMBRES: dict[str, tuple[np.ndarray, float, float]] = {
    "flute": (np.array([1.0, 0.35, 0.12, 0.05]), 0.0, 0.0),
    # Odd harmonics only: the hollow, clarinet-like organ stop.
    "organ": (np.array([1.0 / k if k % 2 else 0.0 for k in range(1, 12)]), 0.0, 0.0),
    "synth": (np.array([1.0 / k for k in range(1, 13)]), 0.0, 0.0),
    # A string plucked at 1/5 of its length: harmonics 5 and 10 vanish, higher ones die out faster.
    "guitar": (
        np.array([abs(np.sin(np.pi * k / 5)) / k**1.2 for k in range(1, 11)]) / np.sin(np.pi / 5),
        2.5,
        1.5,
    ),
}
# Free-bar modes: the inharmonic partials make the bell sound metallic rather than pitched-string-like.
_BELL_RATIOS = np.array([1.0, 2.76, 5.40, 8.93])
_BELL_AMPS = np.array([1.0, 0.5, 0.3, 0.2])
_BELL_DECAYS = np.array([3.0, 6.0, 10.0, 14.0])

_INSTRUMENT_PHRASES = {
    "flute": ("flute", "airy flute", "breathy flute"),
    "organ": ("organ", "electric organ", "reedy organ"),
    "guitar": ("guitar", "plucked guitar", "nylon guitar"),
    "bell": ("bell", "chiming bell", "glassy bell"),
    "synth": ("synth", "sawtooth synth", "buzzy synth"),
}
_NOUNS = ("melody", "tune", "phrase", "line")
# Phrases placed before the instrument ("a fast, loud organ melody"); "{}" is the attribute value.
_HEAD_FORMS = {"tempo": ("{}",), "loudness": ("{}", "very {}")}
# Phrases placed after the noun; every form contains the value itself so attributes are recoverable.
_TRAILING_FORMS = {
    "tempo": ("{} tempo", "at a {} tempo", "{} pace"),
    "loudness": ("at a {} volume", "{} dynamics", "played {}"),
    "register": ("in a {} register", "{} notes", "{} register", "{} pitch"),
    "mode": ("in a {} key", "{} key", "{} scale", "{}"),
}
_TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]+")


@dataclass(frozen=True)
class SyntheticClip:
    """One clip: float32 mono audio (peak <= 1), its caption, and the attributes the caption names."""

    audio: np.ndarray
    caption: str
    attributes: dict[str, str]


def split_caption(caption: str) -> list[str]:
    """Lower-case words with punctuation split off: the one tokenisation `caption_words` is built for."""
    return _TOKEN_PATTERN.findall(caption.lower())


def caption_words() -> list[str]:
    """Every token a caption can split into (words and ","), sorted, so a tokenizer can be built offline."""
    phrases = ["a", "an", ","] + list(_NOUNS)
    phrases += [p for options in _INSTRUMENT_PHRASES.values() for p in options]
    for attribute, templates in list(_HEAD_FORMS.items()) + list(_TRAILING_FORMS.items()):
        phrases += [t.format(value) for t in templates for value in ATTRIBUTES[attribute]]
    return sorted({word for phrase in phrases for word in split_caption(phrase)})


def synthesize_clip(
    index: int, *, seed: int = 0, seconds: float = 2.0, sample_rate: int = 16000
) -> SyntheticClip:
    """Clip `index` of the corpus for `seed`; depends on nothing else, so index ranges make clean splits."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    if seconds < _MIN_SECONDS:
        raise ValueError(f"seconds must be >= {_MIN_SECONDS}, got {seconds}")
    if sample_rate < 4000:
        raise ValueError(f"sample_rate must be >= 4000 Hz to hold the high register, got {sample_rate}")
    rng = np.random.default_rng([seed, index])
    # Draw order is fixed and never depends on `seconds`, so a clip's music and caption do not either.
    attributes = {name: str(values[rng.integers(len(values))]) for name, values in ATTRIBUTES.items()}
    num_samples = int(round(seconds * sample_rate))
    onsets, durations, freqs = _melody(attributes, rng, num_samples, sample_rate)
    legato = rng.uniform(0.8, 0.95)
    peak = rng.uniform(*_PEAK_RANGE[attributes["loudness"]])
    caption = _caption(attributes, rng)
    audio = _render(attributes["instrument"], onsets, durations, freqs, legato, rng, num_samples, sample_rate)
    audio *= peak / np.max(np.abs(audio))
    return SyntheticClip(audio=audio.astype(np.float32), caption=caption, attributes=attributes)


def synthesize_corpus(
    num_clips: int, *, seed: int = 0, seconds: float = 2.0, sample_rate: int = 16000, start: int = 0
) -> list[SyntheticClip]:
    """Clips `start .. start + num_clips - 1`; identical to calling `synthesize_clip` on each index."""
    if num_clips < 0:
        raise ValueError(f"num_clips must be >= 0, got {num_clips}")
    return [
        synthesize_clip(i, seed=seed, seconds=seconds, sample_rate=sample_rate)
        for i in range(start, start + num_clips)
    ]


HELDOUT_START = 10_000_000  # clip indices from here on are never trained on: the held-out (FAD reference) set


def heldout_clips(
    num_clips: int, *, seconds: float = 2.0, sample_rate: int = 16000, seed: int = 0
) -> list[SyntheticClip]:
    """The held-out clips, rendered directly: every world model and default split stays below their indices."""
    return synthesize_corpus(
        num_clips, seed=seed, seconds=seconds, sample_rate=sample_rate, start=HELDOUT_START
    )


def _melody(
    attributes: dict[str, str], rng: np.random.Generator, num_samples: int, sample_rate: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Note onsets (samples), durations (seconds) and frequencies (Hz) of a phrase looped to fill the clip.

    The phrase is the tonic triad (so the mode is heard against a known tonic from the first beat), motif,
    motif shifted up or down the scale, cadence to the tonic: enough repetition that the continuation of a
    clip is predictable from its start.
    """
    rhythm = _MOTIF_RHYTHMS[rng.integers(len(_MOTIF_RHYTHMS))]
    start_degree = rng.integers(0, 5)
    steps = rng.choice([-2, -1, 1, 2], size=len(rhythm) - 1)
    motif = np.clip(np.concatenate([[start_degree], start_degree + np.cumsum(steps)]), 0, 7)
    shift = rng.choice([-2, -1, 1, 2])
    cadence_from = rng.choice([1, 4])
    triad = np.array([0, 2, 4, 2])[: len(rhythm)]  # root, third (major or minor), fifth
    degrees = np.concatenate([triad, motif, motif + shift, [cadence_from, 0]])
    degrees = np.clip(degrees, _LOWEST_DEGREE, _HIGHEST_DEGREE)
    units = np.array(rhythm + rhythm + rhythm + (2, 2), dtype=np.float64)
    tonic = _TONIC_MIDI[attributes["register"]] + rng.integers(0, 5)
    bpm = _BPM[attributes["tempo"]] * rng.uniform(0.96, 1.04)
    eighth_s = 30.0 / bpm

    scale = _SCALES[attributes["mode"]]
    midi = tonic + 12 * (degrees // 7) + scale[degrees % 7]
    phrase_s = units.sum() * eighth_s
    repeats = int(np.ceil(num_samples / sample_rate / phrase_s))
    durations = np.tile(units * eighth_s, repeats)
    onsets_s = np.concatenate([[0.0], np.cumsum(durations)[:-1]])
    onsets = np.round(onsets_s * sample_rate).astype(np.int64)
    keep = onsets < num_samples
    freqs = 440.0 * 2.0 ** ((np.tile(midi, repeats) - 69) / 12.0)
    return onsets[keep], durations[keep], freqs[keep]


def _render(
    instrument: str,
    onsets: np.ndarray,
    durations: np.ndarray,
    freqs: np.ndarray,
    legato: float,
    rng: np.random.Generator,
    num_samples: int,
    sample_rate: int,
) -> np.ndarray:
    """Monophonic float64 audio, one note at a time, every sample vectorised over the whole clip."""
    n = np.arange(num_samples)
    note = np.searchsorted(onsets, n, side="right") - 1
    t = (n - onsets[note]) / sample_rate  # time since this note's onset
    freq = freqs[note]
    # Ringing instruments sound for the whole note; the release always ends before the next onset, so
    # every note starts and stops at zero and there are no clicks.
    gate = durations[note] * (0.97 if instrument in ("guitar", "bell") else legato)
    envelope = np.clip(t / _ATTACK_S[instrument], 0.0, 1.0) * np.clip((gate - t) / _RELEASE_S, 0.0, 1.0)
    envelope *= np.clip((num_samples - 1 - n) / (_END_FADE_S * sample_rate), 0.0, 1.0)
    nyquist_margin = 0.45 * sample_rate

    theta = 2.0 * np.pi * freq * t
    if instrument == "flute":
        vibrato_hz, depth = 5.0, 0.005
        theta += depth * freq / vibrato_hz * np.sin(2.0 * np.pi * vibrato_hz * t)
    if instrument == "bell":
        wave = np.zeros(num_samples)
        for ratio, amp, decay in zip(_BELL_RATIOS, _BELL_AMPS, _BELL_DECAYS, strict=True):
            audible = ratio * freq < nyquist_margin
            wave += amp * audible * np.exp(-decay * t) * np.sin(ratio * theta)
    else:
        amps, decay_base, decay_per_harmonic = _HARMONIC_TIMBRES[instrument]
        wave = _harmonic_sum(theta, freq, t, amps, decay_base, decay_per_harmonic, nyquist_margin)
    audio = envelope * wave
    if instrument == "flute":
        audio += 0.03 * envelope * rng.standard_normal(num_samples)  # breath noise, drawn last
    return audio


def _harmonic_sum(
    theta: np.ndarray,
    freq: np.ndarray,
    t: np.ndarray,
    amps: np.ndarray,
    decay_base: float,
    decay_per_harmonic: float,
    nyquist_margin: float,
) -> np.ndarray:
    """Sum of amps[k-1] * sin(k * theta) with exponential decay per harmonic, dropping aliased ones.

    sin(k*theta) and exp(-(b + c*k) t) come from recurrences, so the cost is a few multiplies per harmonic
    instead of one sin and one exp each.
    """
    two_cos = 2.0 * np.cos(theta)
    sin_prev, sin_k = np.zeros_like(theta), np.sin(theta)
    decaying = decay_base > 0.0 or decay_per_harmonic > 0.0
    decay_k = np.exp(-decay_base * t) if decaying else None
    decay_step = np.exp(-decay_per_harmonic * t) if decaying else None
    wave = np.zeros_like(theta)
    for k, amp in enumerate(amps, start=1):
        if k > 1:
            sin_prev, sin_k = sin_k, two_cos * sin_k - sin_prev
        if decaying:
            decay_k = decay_k * decay_step
        if amp == 0.0:
            continue
        term = amp * sin_k * (k * freq < nyquist_margin)
        wave += term * decay_k if decaying else term
    return wave


def _caption(attributes: dict[str, str], rng: np.random.Generator) -> str:
    """A caption naming every attribute, with randomised word order, synonyms and templates."""
    head_attributes = [name for name in ("tempo", "loudness") if rng.random() < 0.5]
    trailing_attributes = [name for name in _TRAILING_FORMS if name not in head_attributes]
    trailing_attributes = [trailing_attributes[i] for i in rng.permutation(len(trailing_attributes))]

    def pick(options: tuple[str, ...]) -> str:
        return options[rng.integers(len(options))]

    adjectives = [pick(_HEAD_FORMS[name]).format(attributes[name]) for name in head_attributes]
    instrument = pick(_INSTRUMENT_PHRASES[attributes["instrument"]])
    head = " ".join([", ".join(adjectives), instrument, pick(_NOUNS)]).strip()
    if rng.random() < 0.5:
        head = ("an " if head[0] in "aeiou" else "a ") + head
    trailing = [pick(_TRAILING_FORMS[name]).format(attributes[name]) for name in trailing_attributes]
    # "an organ tune in a low register" reads better without a comma before a prepositional phrase.
    joiner = " " if trailing[0].startswith(("in ", "at ")) else ", "
    return head + joiner + ", ".join(trailing)


class SyntheticDataModule(CodesDataModule):
    """The embedded default: seeded synthetic melodies with captions that describe them (no download)."""

    def __init__(
        self, num_train: int = 512, num_val: int = 64, seconds: float = 2.0, seed: int = 0, **kwargs
    ) -> None:
        for key, value in {"num_train": num_train, "num_val": num_val}.items():
            if value < 1:
                raise EmptySplitError(f"data.{key}={value}: the split would be empty; set data.{key} >= 1")
        if seconds <= 0:
            raise ValueError(f"data.seconds={seconds}: clip length must be positive")
        if num_train + num_val > HELDOUT_START:
            raise ValueError(
                f"data.num_train + data.num_val = {num_train + num_val}: clips from index {HELDOUT_START} on are "
                "the held-out evaluation set (data.synthetic.HELDOUT_START); use fewer clips"
            )
        super().__init__(**kwargs)
        self.num_train, self.num_val, self.seconds, self.seed = num_train, num_val, seconds, seed

    def describe(self) -> dict:
        return {
            "kind": "synthetic",
            "num_train": self.num_train,
            "num_val": self.num_val,
            "seconds": self.seconds,
            "seed": self.seed,
        }

    def list_clips(self) -> Listing:
        clips = [ClipRef(f"{i:06d}", "train", None) for i in range(self.num_train)]
        clips += [
            ClipRef(f"{i:06d}", "val", None) for i in range(self.num_train, self.num_train + self.num_val)
        ]
        return Listing(clips)

    def load_clip(self, clip: ClipRef, sample_rate: int, min_samples: int) -> tuple[np.ndarray, str]:
        synthetic = synthesize_clip(
            int(clip.id), seed=self.seed, seconds=self.seconds, sample_rate=sample_rate
        )
        return synthetic.audio, synthetic.caption
