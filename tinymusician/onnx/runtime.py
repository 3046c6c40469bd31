"""Generate music from an exported bundle with ONNX Runtime, NumPy and tokenizers only (no torch).

>>> model = TinyMusicianONNX("bundle/", precision="int8")
>>> audio = model.generate(["lo-fi beat with warm piano"], seconds=10, seed=0)   # float32 [B, samples]
>>> model.last_stats["rtf"]                                                       # compute s / audio s

The loop is transformers' MusicGen ``generate``: the delay pattern (codebook k lags k steps; positions outside
the pattern are forced to the pad token before each step), classifier-free guidance on a doubled batch whose
second half has zeroed text states and mask, then greedy or temperature + top-k sampling. Greedy fp32 runs
reproduce transformers' codes exactly (tests/test_onnx.py).

Prompts: an empty prompt is an error; prompts longer than ``max_text_tokens`` (manifest, 256 by default) are
truncated (a warning names them). Lengths: at least ``min_frames`` codec frames (7 at 50 Hz = 0.14 s; the
codec decoder's first convolution needs them) and at most ``max_frames`` (the position table in the graph).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

GRAPHS = ("text_encoder", "decoder_model_merged", "encodec_decode")
SUFFIXES = {"fp32": "", "int8": "_quantized", "int4": "_q4"}
DECODER_INPUTS = ("input_ids", "encoder_hidden_states", "encoder_attention_mask", "use_cache_branch")


REEXPORT = "re-export it with `python -m tinymusician.export MODEL --out DIR`"


class BundleError(ValueError):
    """A bundle that cannot be used as it is; the message names the file and how to fix it."""


class GenerationError(ValueError):
    """Generation arguments that cannot work (empty prompt, too short or too long)."""


# --- the delay pattern (NumPy twin of tinymusician.models.delay, for a runtime without torch) -------------
def delay_pattern(num_codebooks: int, frames: int, pad: int) -> np.ndarray:
    """``[K, frames + K]`` with -1 where a code is generated and ``pad`` elsewhere (position 0: the start).

    Codebook k holds frame t at position t + k + 1, as transformers' ``build_delay_pattern_mask``.
    """
    length = frames + num_codebooks
    pattern = np.full((num_codebooks, length), pad, dtype=np.int64)
    for k in range(num_codebooks):
        pattern[k, k + 1 : k + 1 + frames] = -1
    return pattern


def undelay(sequence: np.ndarray, frames: int) -> np.ndarray:
    """``[B, K, frames + K]`` delayed codes -> ``[B, K, frames]`` aligned codes."""
    num_codebooks = sequence.shape[1]
    return np.stack([sequence[:, k, k + 1 : k + 1 + frames] for k in range(num_codebooks)], axis=1)


def sample_next(
    scores: np.ndarray, rng: np.random.Generator | None, temperature: float, top_k: int
) -> np.ndarray:
    """Greedy (``rng is None``) or temperature + top-k sampling over ``scores [N, V]`` (float32)."""
    if rng is None:
        return scores.argmax(axis=-1)
    scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = np.partition(scores, -top_k, axis=-1)[:, -top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    cumulative = probs.cumsum(axis=-1)
    draws = rng.random((scores.shape[0], 1)) * cumulative[:, -1:]
    return np.minimum((cumulative < draws).sum(axis=-1), scores.shape[-1] - 1)


def read_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / "manifest.json"
    if not bundle.is_dir():
        raise BundleError(
            f"{bundle}: not a directory. Export one with `python -m tinymusician.export MODEL --out DIR`"
        )
    if not path.is_file():
        raise BundleError(
            f"{path}: missing, so {bundle} is not a TinyMusician ONNX bundle. Export one with "
            "`python -m tinymusician.export MODEL --out DIR`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON ({err}); {REEXPORT}") from err
    if manifest.get("format") != "tinymusician-onnx":
        raise BundleError(f"{path}: format {manifest.get('format')!r} is not 'tinymusician-onnx'; {REEXPORT}")
    missing = [key for key in ("files", "model", "precisions") if key not in manifest]
    if missing:
        raise BundleError(f"{path}: keys {missing} are missing (edited by hand?); {REEXPORT}")
    return manifest


def check_files(
    bundle: Path, manifest: Mapping[str, Any], wanted: Sequence[str], verify_hashes: bool
) -> None:
    """Every wanted graph file exists with the size (and, if asked, the hash) the manifest recorded."""
    import hashlib

    for relative in wanted:
        entry = manifest["files"].get(relative)
        path = bundle / relative
        exported = manifest["precisions"]
        if entry is None:
            raise BundleError(
                f"{bundle}: {relative} was not exported (precisions in this bundle: {exported}); "
                f"re-export with --precision ... or choose one of {exported}"
            )
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle (listed in manifest.json); {REEXPORT}")
        if path.stat().st_size != entry["bytes"]:
            raise BundleError(
                f"{path}: {path.stat().st_size} bytes, but manifest.json says {entry['bytes']}: the file was "
                f"replaced or truncated; {REEXPORT}"
            )
        if verify_hashes:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != entry["sha256"]:
                raise BundleError(f"{path}: sha256 differs from manifest.json; {REEXPORT}")
    for name in ("config.json", "tokenizer.json"):
        if not (bundle / name).is_file():
            raise BundleError(f"{bundle / name}: missing; {REEXPORT}")


def resolve_precisions(precision: str | Mapping[str, str]) -> dict[str, str]:
    """``"int8"`` -> int8 text encoder and decoder, fp32 codec decoder; or an explicit per-graph map."""
    if isinstance(precision, str):
        if precision not in SUFFIXES:
            raise BundleError(f"precision={precision!r}: choose from {list(SUFFIXES)}")
        return {"text_encoder": precision, "decoder_model_merged": precision, "encodec_decode": "fp32"}
    unknown = set(precision) - set(GRAPHS)
    if unknown:
        raise BundleError(f"precision map has unknown graphs {sorted(unknown)}; graphs: {list(GRAPHS)}")
    chosen = {"text_encoder": "fp32", "decoder_model_merged": "fp32", "encodec_decode": "fp32", **precision}
    bad = {g: p for g, p in chosen.items() if p not in SUFFIXES or (g == "encodec_decode" and p != "fp32")}
    if bad:
        raise BundleError(f"precision map {bad}: use {list(SUFFIXES)} (encodec_decode is fp32 only)")
    return chosen


class TinyMusicianONNX:
    """A loaded bundle: three ONNX Runtime sessions, the tokenizer and the facts from ``manifest.json``.

    ``precision``: ``"fp32"``, ``"int8"``, ``"int4"`` (text encoder and decoder; the codec decoder is fp32) or a
    per-graph map; default fp32 if the bundle has it, else its first exported precision.
    """

    def __init__(
        self,
        bundle: str | Path,
        *,
        precision: str | Mapping[str, str] | None = None,
        threads: int | None = None,
        verify_hashes: bool = False,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.bundle = Path(bundle).expanduser()
        self.manifest = read_manifest(self.bundle)
        self.facts = self.manifest["model"]
        exported = self.manifest["precisions"]
        self.precisions = resolve_precisions(precision or ("fp32" if "fp32" in exported else exported[0]))
        files = {g: f"onnx/{g}{SUFFIXES[p]}.onnx" for g, p in self.precisions.items()}
        check_files(self.bundle, self.manifest, list(files.values()), verify_hashes)
        self.check_config()

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
        options.inter_op_num_threads = 1
        self.sessions = {}
        for graph, relative in files.items():
            try:
                self.sessions[graph] = ort.InferenceSession(
                    str(self.bundle / relative), options, providers=["CPUExecutionProvider"]
                )
            except Exception as err:  # onnxruntime raises its own exception types
                raise BundleError(
                    f"{self.bundle / relative}: ONNX Runtime cannot load it ({err}); {REEXPORT}"
                ) from err
        self.check_graphs()
        self.tokenizer = Tokenizer.from_file(str(self.bundle / "tokenizer.json"))
        self.tokenizer.no_padding()  # padding and truncation are done here, the same for every prompt
        self.tokenizer.no_truncation()
        self.pad_text_id = self.tokenizer.token_to_id(self._tokenizer_pad()) or 0
        self.last_stats: dict[str, float] = {}

    # --- validation ---------------------------------------------------------------------------------------
    def check_config(self) -> None:
        config = json.loads((self.bundle / "config.json").read_text())
        decoder = config.get("decoder", {})
        for key, fact in (("num_codebooks", "num_codebooks"), ("num_hidden_layers", "num_layers")):
            if decoder.get(key) != self.facts[fact]:
                raise BundleError(
                    f"{self.bundle / 'config.json'}: decoder.{key}={decoder.get(key)} but the exported graphs "
                    f"have {self.facts[fact]} (manifest.json): config and graphs come from different models"
                )

    def check_graphs(self) -> None:
        decoder = self.sessions["decoder_model_merged"]
        names = {i.name for i in decoder.get_inputs()}
        expected = set(DECODER_INPUTS) | set(self.past_names)
        if names != expected:
            raise BundleError(
                f"{self.bundle}: decoder_model_merged inputs differ from this bundle's manifest "
                f"(missing {sorted(expected - names)[:4]}, unexpected {sorted(names - expected)[:4]}); {REEXPORT}"
            )
        heads = next(i.shape[1] for i in decoder.get_inputs() if i.name == self.past_names[0])
        if heads != self.facts["num_heads"]:
            raise BundleError(
                f"{self.bundle}: decoder has {heads} heads, manifest.json says {self.facts['num_heads']}: "
                f"graphs and manifest come from different exports; {REEXPORT}"
            )

    def _tokenizer_pad(self) -> str:
        path = self.bundle / "tokenizer_config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
        pad = config.get("pad_token", "<pad>")
        return pad["content"] if isinstance(pad, dict) else pad

    # --- facts --------------------------------------------------------------------------------------------
    @property
    def sampling_rate(self) -> int:
        return int(self.facts["sampling_rate"])

    @property
    def frame_rate(self) -> int:
        return int(self.facts["frame_rate"])

    @property
    def past_names(self) -> list[str]:
        kinds = ("decoder.key", "decoder.value", "encoder.key", "encoder.value")
        return [f"past_key_values.{i}.{kind}" for i in range(self.facts["num_layers"]) for kind in kinds]

    def frames_for(self, seconds: float) -> int:
        frames = round(seconds * self.frame_rate)
        low, high = self.facts["min_frames"], self.facts["max_frames"]
        if not low <= frames <= high:
            raise GenerationError(
                f"seconds={seconds}: {frames} codec frames at {self.frame_rate} Hz; this model generates "
                f"{low}..{high} frames ({low / self.frame_rate:.2f}..{high / self.frame_rate:.1f} s): "
                "choose seconds in that range"
            )
        return frames

    # --- steps --------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask ``[B, S]`` (right-padded, truncated to ``max_text_tokens``)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise GenerationError("no prompts given")
        empty = [i for i, p in enumerate(prompts) if not p.strip()]
        if empty:
            raise GenerationError(f"prompt(s) {empty} are empty: describe the music to generate")
        limit = int(self.manifest.get("max_text_tokens", 256))
        encoded = [self.tokenizer.encode(p).ids for p in prompts]
        long = [i for i, ids in enumerate(encoded) if len(ids) > limit]
        if long:
            log.warning("prompt(s) %s longer than %d tokens: truncated", long, limit)
            encoded = [ids[: limit - 1] + ids[-1:] if len(ids) > limit else ids for ids in encoded]
        width = max(len(ids) for ids in encoded)
        input_ids = np.full((len(encoded), width), self.pad_text_id, dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=np.int64)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        return input_ids, mask

    def encode_text(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.sessions["text_encoder"].run(None, {"input_ids": input_ids, "attention_mask": mask})[0]

    def decode_audio(self, codes: np.ndarray) -> np.ndarray:
        """Aligned codes ``[B, K, T]`` -> mono float32 audio ``[B, samples]``."""
        out = self.sessions["encodec_decode"].run(None, {"audio_codes": codes[None].astype(np.int64)})[0]
        return out[:, 0]

    def generate_codes(
        self,
        text_states: np.ndarray,
        text_mask: np.ndarray,
        frames: int,
        *,
        guidance_scale: float = 3.0,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int = 250,
        seed: int | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Autoregressive decoding with the KV cache -> aligned codes ``[B, K, frames]``."""
        facts = self.facts
        num_codebooks, pad = facts["num_codebooks"], facts["pad_token_id"]
        batch = text_states.shape[0]
        guided = guidance_scale is not None and guidance_scale > 1
        if guided:
            text_states = np.concatenate([text_states, np.zeros_like(text_states)])
            text_mask = np.concatenate([text_mask, np.zeros_like(text_mask)])
        rng = np.random.default_rng(seed) if do_sample else None
        pattern = delay_pattern(num_codebooks, frames, pad)
        sequence = np.full((batch, num_codebooks, pattern.shape[1]), pad, dtype=np.int64)
        # position 0 holds the start token (MusicGen's decoder_start_token_id is its pad id, as the pattern says)
        sequence[:, :, 0] = facts["decoder_start_token_id"]
        rows = text_states.shape[0]
        empty = np.zeros((rows, facts["num_heads"], 0, facts["head_dim"]), dtype=np.float32)
        feeds: dict[str, np.ndarray] = {
            "encoder_hidden_states": text_states.astype(np.float32),
            "encoder_attention_mask": text_mask.astype(np.int64),
            **{name: empty for name in self.past_names},
        }
        session = self.sessions["decoder_model_merged"]
        steps = pattern.shape[1] - 1
        for step in range(steps):
            ids = sequence[:, :, step].reshape(batch * num_codebooks, 1)
            feeds["input_ids"] = np.concatenate([ids, ids]) if guided else ids
            feeds["use_cache_branch"] = np.array([step > 0])
            logits, *present = session.run(None, feeds)
            for name, value in zip(self.past_names, present, strict=True):
                feeds[name] = value
            scores = logits[:, -1, :].astype(np.float32)
            if guided:
                cond, uncond = scores[: batch * num_codebooks], scores[batch * num_codebooks :]
                scores = uncond + (cond - uncond) * np.float32(guidance_scale)
            tokens = sample_next(scores, rng, temperature, top_k).reshape(batch, num_codebooks)
            forced = pattern[:, step + 1]
            sequence[:, :, step + 1] = np.where(forced == -1, tokens, forced)
            if on_step is not None:
                on_step(step + 1, steps)
        return undelay(sequence, frames)

    def generate(
        self,
        prompts: str | Sequence[str],
        seconds: float = 10.0,
        *,
        guidance_scale: float = 3.0,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int = 250,
        seed: int | None = None,
        progress: bool = False,
        return_codes: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Mono float32 waveforms ``[B, samples]`` at :attr:`sampling_rate` (and the codes if asked).

        ``do_sample=False`` is greedy decoding; ``seed`` makes sampling reproducible. ``last_stats`` holds the
        timing of this call (seconds per stage, real-time factor = compute seconds / audio seconds).
        """
        if do_sample and temperature <= 0:
            raise GenerationError(f"temperature={temperature}: must be > 0 (use do_sample=False for greedy)")
        frames = self.frames_for(seconds)
        started = time.perf_counter()
        input_ids, mask = self.encode_prompts(prompts)
        text_states = self.encode_text(input_ids, mask)
        encoded = time.perf_counter()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=frames + self.facts["num_codebooks"] - 1, desc="Generating", unit="step")
        codes = self.generate_codes(
            text_states,
            mask,
            frames,
            guidance_scale=guidance_scale,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            on_step=(lambda done, total: bar.update(1)) if bar is not None else None,
        )
        if bar is not None:
            bar.close()
        decoded = time.perf_counter()
        audio = self.decode_audio(codes)
        finished = time.perf_counter()
        audio_seconds = frames / self.frame_rate
        self.last_stats = {
            "text_encoder_s": encoded - started,
            "decoder_s": decoded - encoded,
            "decoder_step_ms": 1000 * (decoded - encoded) / (frames + self.facts["num_codebooks"] - 1),
            "encodec_decode_s": finished - decoded,
            "compute_s": finished - started,
            "audio_s": audio_seconds,
            "rtf": (finished - started) / audio_seconds,
        }
        return (audio, codes) if return_codes else audio
