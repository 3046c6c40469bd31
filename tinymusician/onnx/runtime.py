"""Generate music from an exported bundle with ONNX Runtime, NumPy and tokenizers only (no torch).

>>> model = TinyMusicianONNX("bundle/", precision="int8")
>>> audio = model.generate(["lo-fi beat with warm piano"], seconds=10, seed=0)   # float32 [B, samples]
>>> model.last_stats["rtf"]                                                       # compute s / audio s

The loop is transformers' MusicGen ``generate``: the delay pattern (codebook k lags k steps; positions outside
the pattern are forced to the pad token before each step), classifier-free guidance on a doubled batch whose
second half has zeroed text states and mask, then greedy or temperature + top-k sampling. Greedy fp32 runs
reproduce transformers' codes exactly (tests/onnx/test_runtime.py).

Prompts: an empty prompt is an error; prompts longer than ``max_text_tokens`` (manifest, 256 by default) are
truncated (a warning names them). Lengths: at least ``min_frames`` codec frames (7 at 50 Hz = 0.14 s; the
codec decoder's first convolution needs them) and at most ``max_frames`` (the position table in the graph).

Loading checks the bundle before any session starts: ``manifest.json`` against ``config.json`` (format version,
sampling rate, frame limits), every graph file's size, and its sha256 once per file version (remembered in
``$TINYMUSICIAN_CACHE``/``~/.cache/tinymusician``; ``verify=False`` skips the hash). Errors name the file and key.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tinymusician.models.generation import GenerationError
from tinymusician.onnx.int8_kernel import exact_int8_options
from tinymusician.onnx.layout import (
    DECODER_INPUTS,
    FAST_DECODER_INPUTS,
    FAST_GRAPHS,
    FORMAT,
    FORMAT_VERSIONS,
    GRAPHS,
    PRECISIONS,
    cache_names,
    graph_file,
    past_names,
    text_kv_names,
)

log = logging.getLogger(__name__)

REEXPORT = "re-export it with `python -m tinymusician.export MODEL --out DIR`"


class BundleError(ValueError):
    """A bundle that cannot be used as it is; the message names the file and how to fix it."""


# --- the delay pattern (NumPy, for a runtime without torch; teacher forcing's is models.delay) ------------
def delay_pattern_mask(num_codebooks: int, frames: int, pad: int) -> np.ndarray:
    """``[K, frames + K]`` with -1 where a code is generated and ``pad`` elsewhere (position 0: the start).

    Codebook k holds frame t at position t + k + 1: the twin of transformers' ``build_delay_pattern_mask``.
    """
    length = frames + num_codebooks
    pattern = np.full((num_codebooks, length), pad, dtype=np.int64)
    for k in range(num_codebooks):
        pattern[k, k + 1 : k + 1 + frames] = -1
    return pattern


def undelay(sequence: np.ndarray, frames: int, first: int = 0) -> np.ndarray:
    """``[B, K, frames + K]`` delayed codes -> ``[B, K, frames - first]`` aligned codes (frames first..frames-1)."""
    num_codebooks = sequence.shape[1]
    return np.stack([sequence[:, k, k + 1 + first : k + 1 + frames] for k in range(num_codebooks)], axis=1)


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


# manifest.json "model" facts: all integers; these two may be 0 (token ids), the rest must be positive
MODEL_FACTS = (
    "num_codebooks",
    "vocab_size",
    "pad_token_id",
    "decoder_start_token_id",
    "num_layers",
    "num_heads",
    "head_dim",
    "text_hidden_size",
    "sampling_rate",
    "frame_rate",
    "min_frames",
    "max_frames",
)
TOKEN_IDS = ("pad_token_id", "decoder_start_token_id")
# stream(): codec frames decoded on each side of a chunk. The tiny codec's one-shot decode is matched to 4e-7
# with 32 on the left (its LSTM's memory) and 4 on the right (its non-causal convolutions); 8 leaves a margin.
STREAM_CONTEXT_FRAMES = 32
# the first chunk's audio: 10 frames at 50 Hz, so the first audio waits for 10 + lookahead + K - 1 decoder steps
STREAM_FIRST_CHUNK_SECONDS = 0.2
STREAM_LOOKAHEAD_FRAMES = 8
# decode_audio(): longer clips are decoded in windows of this many seconds (the same overlap as stream()), so
# the codec's activations are one window's. MusicGen's codec on 10 s: 410 MB more at once, 270 MB with 5 s
# windows, 140 MB with 2 s ones, which cost 10% / 32% more codec time (the overlap); audio equal to ~1e-7
DECODE_WINDOW_SECONDS = 3.0
VERIFIED_FILE = "verified-onnx.json"  # in the cache dir: graph files already hashed (see check_files)
VERIFIED_LIMIT = 512


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(
            f"{path}: not valid JSON ({err}), so the {what} cannot be read; {REEXPORT}"
        ) from err


def read_manifest(bundle: Path) -> dict[str, Any]:
    """``manifest.json``, checked for the keys and types the runtime relies on (errors name the key)."""
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
    manifest = read_json(path, "bundle description")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{path}: format {found!r} is not {FORMAT!r}; {REEXPORT}")
    missing = [key for key in ("files", "model", "precisions") if key not in manifest]
    if missing:
        raise BundleError(f"{path}: keys {missing} are missing (edited by hand?); {REEXPORT}")
    check_manifest(path, manifest)
    return manifest


def check_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    """Types and ranges of what generation reads from ``manifest.json`` (a hand edit fails here, not in ORT)."""
    fix = f"restore the exported manifest.json or {REEXPORT}"
    version = manifest.get("format_version", 1)  # bundles are version 1 since the first export
    if version not in FORMAT_VERSIONS or not is_int(version):
        raise BundleError(
            f"{path}: format_version={version!r} is not supported; this tinymusician reads format_version "
            f"{list(FORMAT_VERSIONS)}. Use the tinymusician version that wrote the bundle, or {REEXPORT}"
        )
    precisions = manifest["precisions"]
    if not isinstance(precisions, list) or not precisions or any(p not in PRECISIONS for p in precisions):
        raise BundleError(f"{path}: precisions={precisions!r}: a non-empty list of {list(PRECISIONS)}; {fix}")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{path}: files must map graph files to their bytes and sha256; {fix}")
    for relative, entry in files.items():
        ok = isinstance(entry, dict) and is_int(entry.get("bytes")) and isinstance(entry.get("sha256"), str)
        if not ok:
            raise BundleError(
                f"{path}: files[{relative!r}] needs integer 'bytes' and a 'sha256' string; {fix}"
            )
    facts = manifest["model"]
    if not isinstance(facts, dict):
        raise BundleError(f"{path}: model must be an object of integers {list(MODEL_FACTS)}; {fix}")
    for key in MODEL_FACTS:
        value = facts.get(key)
        low = 0 if key in TOKEN_IDS else 1
        if not is_int(value) or value < low:
            raise BundleError(
                f"{path}: model.{key}={value!r}: must be an integer >= {low} (a JSON number, not a string); {fix}"
            )
    if facts["min_frames"] > facts["max_frames"]:
        raise BundleError(
            f"{path}: model.min_frames={facts['min_frames']} > model.max_frames={facts['max_frames']}; {fix}"
        )
    limit = manifest.get("max_text_tokens", 256)
    if not is_int(limit) or limit < 1:
        raise BundleError(f"{path}: max_text_tokens={limit!r}: must be a positive integer; {fix}")


# --- integrity: sizes always, sha256 once per file (remembered in the cache dir) ---------------------------
def cache_dir() -> Path:
    """Where the runtime remembers verified files: ``$TINYMUSICIAN_CACHE`` or ``~/.cache/tinymusician``
    (the same directory as the tiny models and token caches, conf/paths)."""
    return Path(os.environ.get("TINYMUSICIAN_CACHE") or Path.home() / ".cache" / "tinymusician").expanduser()


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_identity(path: Path) -> dict[str, int]:
    """What changes when the file's bytes may have: ctime cannot be set back by hand, inode catches a copy."""
    stat = path.stat()
    return {
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "ino": stat.st_ino,
    }


def read_verified() -> dict[str, Any]:
    path = cache_dir() / VERIFIED_FILE
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or damaged: it is only a cache, start again
        return {}
    return entries if isinstance(entries, dict) else {}


def write_verified(entries: dict[str, Any]) -> None:
    """Atomic replace; an unwritable cache only costs a re-hash on the next load."""
    directory = cache_dir()
    kept = dict(list(((k, v) for k, v in entries.items() if Path(k).exists()))[-VERIFIED_LIMIT:])
    scratch = directory / f".{VERIFIED_FILE}.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        scratch.write_text(json.dumps(kept, indent=1))
        os.replace(scratch, directory / VERIFIED_FILE)
    except OSError as err:
        log.debug(
            "cannot remember verified files in %s (%s); they are hashed again next time", directory, err
        )


def check_files(
    bundle: Path,
    manifest: Mapping[str, Any],
    wanted: Sequence[str],
    verify: bool = True,
    *,
    rehash: bool = False,
) -> None:
    """Every wanted graph file exists with the size and sha256 that ``manifest.json`` recorded.

    Sizes are checked on every load. ``verify``: also the sha256, once per file version: a verified file's
    (path, size, mtime, ctime, inode) is remembered in ``<cache dir>/verified-onnx.json`` and not hashed again
    while they stay the same (hashing MusicGen-Small's 400 MB int8 decoder costs about 1 s here, a later load
    about 0.1 ms). ``rehash`` ignores what was remembered. ``verify=False`` (``--no-verify``) checks sizes
    only: for bundles on read-only media checked otherwise, or to save that second on the first load.
    """
    remembered = read_verified() if verify else {}
    changed = False
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
        if not verify:
            continue
        key = str(path.resolve())
        identity = {**file_identity(path), "sha256": entry["sha256"]}
        if not rehash and remembered.get(key) == identity:
            continue
        started = time.perf_counter()
        if file_sha256(path) != entry["sha256"]:
            stale = remembered.pop(key, None) is not None
            if changed or stale:
                write_verified(remembered)
            raise BundleError(
                f"{path}: sha256 differs from manifest.json, so its contents changed after export (a damaged "
                f"copy or download); {REEXPORT} or copy the file again"
            )
        log.debug("verified %s in %.0f ms", path, 1000 * (time.perf_counter() - started))
        remembered.pop(key, None)  # re-insert at the end: the most recently verified are kept
        remembered[key] = identity
        changed = True
    if changed:
        write_verified(remembered)
    for name in ("config.json", "tokenizer.json"):
        if not (bundle / name).is_file():
            raise BundleError(f"{bundle / name}: missing; {REEXPORT}")


def resolve_precisions(precision: str | Mapping[str, str]) -> dict[str, str]:
    """``"int8"`` -> int8 text encoder and decoder, fp32 codec decoder; or an explicit per-graph map."""
    if isinstance(precision, str):
        if precision not in PRECISIONS:
            raise BundleError(f"precision={precision!r}: choose from {list(PRECISIONS)}")
        return {"text_encoder": precision, "decoder_model_merged": precision, "encodec_decode": "fp32"}
    unknown = set(precision) - set(GRAPHS)
    if unknown:
        raise BundleError(f"precision map has unknown graphs {sorted(unknown)}; graphs: {list(GRAPHS)}")
    chosen = {"text_encoder": "fp32", "decoder_model_merged": "fp32", "encodec_decode": "fp32", **precision}
    bad = {g: p for g, p in chosen.items() if p not in PRECISIONS or (g == "encodec_decode" and p != "fp32")}
    if bad:
        raise BundleError(f"precision map {bad}: use {list(PRECISIONS)} (encodec_decode is fp32 only)")
    return chosen


CACHE_TYPES = {"tensor(float16)": np.float16, "tensor(int8)": np.int8}  # else fp32: the fast cache's storage


class FastDecoderSteps:
    """The fast decoder's loop state: the text's keys/values (computed once by ``decoder_text_kv``) and one
    ``[R, H, capacity, D]`` buffer per layer's self-attention keys and values, bound as both input and output
    of ``decoder_fast`` (ONNX Runtime IO binding), so each step writes one position in place and copies
    nothing. Capacity = the generation's steps (<= the position table, checked by ``frames_for``)."""

    def __init__(self, runtime: TinyMusicianONNX, states: np.ndarray, mask: np.ndarray, steps: int) -> None:
        ort, facts = runtime._ort, runtime.facts
        num_layers, rows = facts["num_layers"], states.shape[0]
        self.session = runtime.sessions["decoder_fast"]
        text_kv = runtime.sessions["decoder_text_kv"].run(
            text_kv_names(num_layers), {"encoder_hidden_states": states, "encoder_attention_mask": mask}
        )
        cache_type = next(i.type for i in self.session.get_inputs() if i.name == cache_names(num_layers)[0])
        dtype = CACHE_TYPES.get(cache_type, np.float32)
        shape = (rows, facts["num_heads"], steps, facts["head_dim"])
        self.keep = [mask, *text_kv]  # the binding reads these arrays' memory: keep them alive
        self.binding = binding = self.session.io_binding()
        binding.bind_cpu_input("encoder_attention_mask", mask)
        for name, value in zip(text_kv_names(num_layers), text_kv, strict=True):
            binding.bind_cpu_input(name, value)
        for name, out_name in zip(cache_names(num_layers), cache_names(num_layers, "present"), strict=True):
            buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype))
            self.keep.append(buffer)
            binding.bind_ortvalue_input(name, buffer)
            binding.bind_ortvalue_output(out_name, buffer)
        self.logits = np.zeros((rows * facts["num_codebooks"], 1, facts["vocab_size"]), np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))
        self.rows, self.capacity = rows, steps

    def __call__(self, ids: np.ndarray, step: int) -> np.ndarray:
        if not 0 <= step < self.capacity:
            raise GenerationError(f"decoder step {step} is outside the cache's {self.capacity} positions")
        binding = self.binding
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", np.full(self.rows, step, dtype=np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(step + 1, dtype=np.int32))
        self.session.run_with_iobinding(binding)
        return self.logits[:, -1, :]


def return_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    ONNX Runtime frees each weight's file copy once it has prepacked it for its matmul kernel, but glibc keeps
    such pages resident: MusicGen-Small's int8 decoder held 657 MB after loading, 453 MB after a trim (its file
    is 405 MB)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl without it, Windows)
        return
    trim(0)


def has_fast_decoder(manifest: Mapping[str, Any], precision: str) -> bool:
    """Whether the bundle has the fast decoder's graphs in ``precision`` (export's ``--no-fast-decoder`` and
    bundles from before it have none)."""
    return all(graph_file(g, precision) in manifest["files"] for g in FAST_GRAPHS)


class TinyMusicianONNX:
    """A loaded bundle: its ONNX Runtime sessions (text encoder, decoder graphs, codec), the tokenizer and the facts
    from ``manifest.json``.

    ``precision``: ``"fp32"``, ``"int8"``, ``"int4"`` (text encoder and decoder; the codec decoder is fp32) or a
    per-graph map; default fp32 if the bundle has it, else its first exported precision.
    ``verify`` (default on): each graph file's sha256 must match ``manifest.json``; a file is hashed once and
    remembered in the cache dir while it is unchanged (:func:`check_files`). ``verify=False`` checks sizes only;
    ``verify_hashes=True`` re-hashes even files verified before.
    ``decoder``: ``"auto"`` (default) steps with the fast decoder (in-place KV cache) when the bundle has it for
    the decoder's precision, else with ``decoder_model_merged`` (transformers.js's graph); ``"fast"`` or
    ``"merged"`` insist. Both give the same codes (fp32: equal; tests/onnx/test_fast_decoder.py).
    """

    def __init__(
        self,
        bundle: str | Path,
        *,
        precision: str | Mapping[str, str] | None = None,
        threads: int | None = None,
        verify: bool = True,
        verify_hashes: bool = False,
        decoder: str = "auto",
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self._ort = ort

        self.bundle = Path(bundle).expanduser()
        self.manifest = read_manifest(self.bundle)
        self.facts = self.manifest["model"]
        # what generate uses when not told: 1 (one pass) for a guidance-distilled student; bundles exported
        # before the manifest said so are ordinary models, guided at MusicGen's 3
        self.default_guidance_scale = float((self.manifest.get("guidance") or {}).get("default_scale", 3.0))
        exported = self.manifest["precisions"]
        self.precisions = resolve_precisions(precision or ("fp32" if "fp32" in exported else exported[0]))
        self.decoder = self.choose_decoder(decoder)
        files = {g: graph_file(g, p) for g, p in self.precisions.items()}
        if self.decoder == "fast":  # the merged decoder is not loaded (memory): the fast graphs replace it
            del files["decoder_model_merged"]
            files |= {g: graph_file(g, self.precisions["decoder_model_merged"]) for g in FAST_GRAPHS}
        check_files(
            self.bundle, self.manifest, list(files.values()), verify or verify_hashes, rehash=verify_hashes
        )
        self.check_config()

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
        options.inter_op_num_threads = 1
        self.int8_kernel = self.decoder_int8_kernel(options)
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
            return_freed_memory()  # before the next graph loads: the peak is one graph's unpacked weights
        self.check_graphs()
        path = self.bundle / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception carrying serde's message
            raise BundleError(
                f"{path}: not a valid tokenizers file ({err}); copy it again from the model the bundle was "
                f"exported from (its save_pretrained directory has the same tokenizer.json), or {REEXPORT}"
            ) from err
        self.tokenizer.no_padding()  # padding and truncation are done here, the same for every prompt
        self.tokenizer.no_truncation()
        self.pad_text_id = self.tokenizer.token_to_id(self._tokenizer_pad()) or 0
        self.last_stats: dict[str, float] = {}

    def decoder_int8_kernel(self, options: Any) -> str | None:
        """The integer product the decoder's matmuls run (None: not an int8 decoder). The fast decoder's int8
        weights run U8S8, or U8U8 where U8S8 would saturate (``options`` then get the session option that converts
        them; :mod:`~tinymusician.onnx.int8_kernel`, probed only here). The merged decoder, and fast graphs exported
        before they held int8 weights, have uint8 weights: U8U8 on every CPU."""
        if self.precisions["decoder_model_merged"] != "int8":
            return None
        fast = (self.manifest.get("quantization", {}).get("int8") or {}).get("fast_decoder") or {}
        if self.decoder == "fast" and str(fast.get("weights", "")).startswith("int8"):
            return exact_int8_options(options)
        return "U8U8"

    # --- validation ---------------------------------------------------------------------------------------
    def check_config(self) -> None:
        """``config.json`` and ``manifest.json`` describe the same model (a hand edit of either fails here)."""
        path = self.bundle / "config.json"
        config = read_json(path, "model configuration")
        decoder = config.get("decoder", {}) if isinstance(config, dict) else {}
        codec = config.get("audio_encoder", {}) if isinstance(config, dict) else {}
        facts, manifest = self.facts, self.bundle / "manifest.json"
        for key, fact in (
            ("num_codebooks", "num_codebooks"),
            ("num_hidden_layers", "num_layers"),
            ("num_attention_heads", "num_heads"),
            ("vocab_size", "vocab_size"),
        ):
            if decoder.get(key) != facts[fact]:
                raise BundleError(
                    f"{path}: decoder.{key}={decoder.get(key)} but the exported graphs have {facts[fact]} "
                    f"({manifest}: model.{fact}): config and graphs come from different models; {REEXPORT}"
                )
        fix = f"restore the exported {manifest.name} (or config.json), or {REEXPORT}"
        rate = codec.get("sampling_rate")
        if rate != facts["sampling_rate"]:
            raise BundleError(
                f"{manifest}: model.sampling_rate={facts['sampling_rate']} but {path} says the codec decodes "
                f"at audio_encoder.sampling_rate={rate}: WAVs would play at the wrong speed; {fix}"
            )
        ratios = codec.get("upsampling_ratios")
        if ratios and is_int(rate):
            hop = int(np.prod(ratios))  # models.musicgen.codec_hop on config.json (that module needs torch)
            if facts["frame_rate"] != -(-rate // hop):
                raise BundleError(
                    f"{manifest}: model.frame_rate={facts['frame_rate']} but the codec in {path} makes "
                    f"{-(-rate // hop)} frames/s ({rate} Hz / hop {hop}); {fix}"
                )
        positions = decoder.get("max_position_embeddings")
        if is_int(positions):
            most = positions - facts["num_codebooks"] + 1  # the delayed sequence must fit the position table
            if facts["max_frames"] > most:
                raise BundleError(
                    f"{manifest}: model.max_frames={facts['max_frames']}, but the decoder's position table "
                    f"({path}: decoder.max_position_embeddings={positions}) holds at most {most} frames "
                    f"with {facts['num_codebooks']} codebooks; {fix}"
                )
        kernel = codec.get("kernel_size")
        least = max(facts["num_codebooks"], kernel if is_int(kernel) else 0)
        if facts["min_frames"] < least:
            raise BundleError(
                f"{manifest}: model.min_frames={facts['min_frames']}, but the delay pattern and the codec "
                f"decoder's first convolution ({path}: audio_encoder.kernel_size={kernel}) need at least "
                f"{least}; {fix}"
            )

    def choose_decoder(self, decoder: str) -> str:
        """``"fast"`` or ``"merged"``: which decoder graph steps (see the class docstring)."""
        if decoder not in ("auto", "fast", "merged"):
            raise BundleError(f"decoder={decoder!r}: choose from 'auto', 'fast', 'merged'")
        precision = self.precisions["decoder_model_merged"]
        has_fast = has_fast_decoder(self.manifest, precision)
        if decoder == "fast" and not has_fast:
            raise BundleError(
                f"{self.bundle}: has no fast decoder in {precision} (manifest.json lists no "
                f"{graph_file(FAST_GRAPHS[0], precision)}; exported with --no-fast-decoder or before it "
                f"existed); use decoder='merged', or {REEXPORT}"
            )
        return "fast" if decoder == "fast" or (decoder == "auto" and has_fast) else "merged"

    def check_graphs(self) -> None:
        num_layers = self.facts["num_layers"]
        if self.decoder == "fast":
            graph = "decoder_fast"
            expected = {*FAST_DECODER_INPUTS, *cache_names(num_layers), *text_kv_names(num_layers)}
        else:
            graph, expected = "decoder_model_merged", set(DECODER_INPUTS) | set(self.past_names)
        decoder = self.sessions[graph]
        names = {i.name for i in decoder.get_inputs()}
        if names != expected:
            raise BundleError(
                f"{self.bundle}: {graph} inputs differ from this bundle's manifest "
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
        config = read_json(path, "tokenizer configuration") if path.is_file() else {}
        pad = config.get("pad_token", "<pad>") if isinstance(config, dict) else "<pad>"
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
        return past_names(self.facts["num_layers"])

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

    def decode_audio(
        self, codes: np.ndarray, *, window_seconds: float | None = DECODE_WINDOW_SECONDS
    ) -> np.ndarray:
        """Aligned codes ``[B, K, T]`` -> mono float32 audio ``[B, samples]``.

        Clips longer than ``window_seconds`` (None: never) are decoded window by window with
        :data:`STREAM_CONTEXT_FRAMES` / :data:`STREAM_LOOKAHEAD_FRAMES` of overlap, as :meth:`stream` does: the
        same audio (to ~1e-7) without holding the codec's activations for the whole clip at once."""
        frames = codes.shape[-1]
        window = frames if window_seconds is None else max(1, round(window_seconds * self.frame_rate))
        if frames <= window + STREAM_LOOKAHEAD_FRAMES:
            return self.decode_span(codes, 0, 0, frames)
        pieces = []
        for start in range(0, frames, window):
            until = min(frames, start + window)
            low, high = max(0, start - STREAM_CONTEXT_FRAMES), min(frames, until + STREAM_LOOKAHEAD_FRAMES)
            pieces.append(self.decode_span(codes[..., low:high], low, start, until))
        return np.concatenate(pieces, axis=1)

    def decode_span(self, codes: np.ndarray, low: int, start: int, until: int) -> np.ndarray:
        """Aligned codes of frames ``low..`` -> the audio of frames ``start..until - 1`` (the rest of the window
        is context on either side)."""
        audio = self.sessions["encodec_decode"].run(None, {"audio_codes": codes[None].astype(np.int64)})[0]
        hop = round(self.sampling_rate / self.frame_rate)
        return audio[:, 0, (start - low) * hop : (until - low) * hop]

    def generate_codes(
        self,
        text_states: np.ndarray,
        text_mask: np.ndarray,
        frames: int,
        *,
        on_step: Callable[[int, int], None] | None = None,
        **decoding: Any,
    ) -> np.ndarray:
        """Autoregressive decoding with the KV cache -> aligned codes ``[B, K, frames]``.

        ``decoding``: :meth:`code_steps`'s options (guidance_scale=None: the bundle's default, <= 1 one pass).
        """
        steps = frames + self.facts["num_codebooks"] - 1
        sequence = None
        for step, sequence in self.code_steps(text_states, text_mask, frames, **decoding):  # noqa: B007
            if on_step is not None:
                on_step(step, steps)
        return undelay(sequence, frames)

    def decoder_steps(
        self, text_states: np.ndarray, text_mask: np.ndarray, steps: int
    ) -> Callable[[np.ndarray, int], np.ndarray]:
        """A decoder over ``steps`` positions for these text rows: ``decode(ids [R, 1], step) -> logits [R, V]``
        (fp32; R = text rows x K), called for step 0, 1, ... in turn. The returned array may be reused by the
        next call: copy what you keep."""
        states, mask = text_states.astype(np.float32), text_mask.astype(np.int64)
        if self.decoder == "fast":
            return FastDecoderSteps(self, states, mask, steps)
        rows = states.shape[0]
        empty = np.zeros((rows, self.facts["num_heads"], 0, self.facts["head_dim"]), dtype=np.float32)
        feeds: dict[str, np.ndarray] = {
            "encoder_hidden_states": states,
            "encoder_attention_mask": mask,
            **{name: empty for name in self.past_names},
        }
        session = self.sessions["decoder_model_merged"]

        def decode(ids: np.ndarray, step: int) -> np.ndarray:
            feeds["input_ids"] = ids
            feeds["use_cache_branch"] = np.array([step > 0])
            logits, *present = session.run(None, feeds)
            feeds.update(zip(self.past_names, present, strict=True))  # the concatenated (copied) cache
            return logits[:, -1, :].astype(np.float32)

        return decode

    def code_steps(
        self,
        text_states: np.ndarray,
        text_mask: np.ndarray,
        frames: int,
        *,
        guidance_scale: float | None = None,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int = 250,
        seed: int | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """The decoding loop, one step at a time: yields ``(step, sequence)`` after position ``step`` of the
        delayed ``sequence [B, K, frames + K]`` is written (frame f of every codebook is final once
        ``step >= f + K``). The same array is updated in place; copy what you keep."""
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        facts = self.facts
        num_codebooks, pad = facts["num_codebooks"], facts["pad_token_id"]
        batch = text_states.shape[0]
        guided = guidance_scale is not None and guidance_scale > 1
        if guided:
            text_states = np.concatenate([text_states, np.zeros_like(text_states)])
            text_mask = np.concatenate([text_mask, np.zeros_like(text_mask)])
        rng = np.random.default_rng(seed) if do_sample else None
        pattern = delay_pattern_mask(num_codebooks, frames, pad)
        sequence = np.full((batch, num_codebooks, pattern.shape[1]), pad, dtype=np.int64)
        # position 0 holds the start token (MusicGen's decoder_start_token_id is its pad id, as the pattern says)
        sequence[:, :, 0] = facts["decoder_start_token_id"]
        steps = pattern.shape[1] - 1
        decode = self.decoder_steps(text_states, text_mask, steps)
        for step in range(steps):
            ids = sequence[:, :, step].reshape(batch * num_codebooks, 1)
            scores = decode(np.concatenate([ids, ids]) if guided else ids, step)
            if guided:
                cond, uncond = scores[: batch * num_codebooks], scores[batch * num_codebooks :]
                scores = uncond + (cond - uncond) * np.float32(guidance_scale)
            tokens = sample_next(scores, rng, temperature, top_k).reshape(batch, num_codebooks)
            forced = pattern[:, step + 1]
            sequence[:, :, step + 1] = np.where(forced == -1, tokens, forced)
            yield step + 1, sequence

    def stream(
        self,
        prompts: str | Sequence[str],
        seconds: float = 10.0,
        *,
        chunk_seconds: float = 0.5,
        first_chunk_seconds: float | None = STREAM_FIRST_CHUNK_SECONDS,
        context_frames: int = STREAM_CONTEXT_FRAMES,
        lookahead_frames: int = STREAM_LOOKAHEAD_FRAMES,
        guidance_scale: float | None = None,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int = 250,
        seed: int | None = None,
    ) -> Iterator[np.ndarray]:
        """Audio ``[B, samples]`` chunks of about ``chunk_seconds`` as the codes arrive; concatenated, they are the
        one-shot decode of the same codes (to ~1e-6 on the tiny codec with the defaults).

        The codec decoder runs on overlapping windows: ``context_frames`` already-played frames on the left (its
        LSTM forgets where a window starts) and ``lookahead_frames`` not-yet-played ones on the right (its
        non-causal convolutions read ahead); only the samples between are emitted. The first chunk is shorter
        (``first_chunk_seconds``; None: ``chunk_seconds``) so that playback starts sooner. Same decoding as
        :meth:`generate` (same seed, same codes); ``last_stats`` holds ``first_audio_s`` (time to the first chunk).
        """
        if do_sample and temperature <= 0:
            raise GenerationError(f"temperature={temperature}: must be > 0 (use do_sample=False for greedy)")
        first_chunk_seconds = chunk_seconds if first_chunk_seconds is None else first_chunk_seconds
        if not (chunk_seconds > 0 and first_chunk_seconds > 0) or context_frames < 0 or lookahead_frames < 0:
            raise GenerationError(
                f"chunk_seconds={chunk_seconds}, first_chunk_seconds={first_chunk_seconds}, context_frames="
                f"{context_frames}, lookahead_frames={lookahead_frames}: chunks must be positive, context and "
                "lookahead >= 0"
            )
        frames = self.frames_for(seconds)
        # the codec graph reflect-pads its first convolution: every window needs min_frames frames
        shortest = max(1, int(self.facts["min_frames"]) - lookahead_frames)
        first, chunk = (
            max(shortest, round(s * self.frame_rate)) for s in (first_chunk_seconds, chunk_seconds)
        )
        num_codebooks = self.facts["num_codebooks"]
        started = time.perf_counter()
        input_ids, mask = self.encode_prompts(prompts)
        text_states = self.encode_text(input_ids, mask)
        first_audio, played, chunks = None, 0, 0
        options = {"guidance_scale": guidance_scale, "do_sample": do_sample, "temperature": temperature}
        for step, sequence in self.code_steps(text_states, mask, frames, top_k=top_k, seed=seed, **options):
            final = min(frames, step - num_codebooks + 1)  # frames whose every codebook is written
            if final == frames:
                until = frames
            elif final - lookahead_frames - played >= (chunk if played else first):
                until = final - lookahead_frames
            else:
                continue
            low, high = max(0, played - context_frames), min(final, until + lookahead_frames)
            audio = self.decode_span(undelay(sequence, high, low), low, played, until)
            played, chunks = until, chunks + 1
            if first_audio is None:
                first_audio = time.perf_counter() - started
            yield audio
            if played == frames:
                break
        compute = time.perf_counter() - started
        self.last_stats = {
            "first_audio_s": first_audio,
            "chunks": chunks,
            "compute_s": compute,
            "audio_s": frames / self.frame_rate,
            "rtf": compute / (frames / self.frame_rate),
        }

    def generate(
        self,
        prompts: str | Sequence[str],
        seconds: float = 10.0,
        *,
        guidance_scale: float | None = None,
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
