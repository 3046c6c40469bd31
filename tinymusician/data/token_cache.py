"""On-disk cache of codec tokens, so the audio codec runs once per corpus and not every step.

A cache entry is a safetensors file of codes ``[N, K, T]`` (+ lengths) with the captions in its metadata,
named by a hash of everything that determines it (corpus parameters and the codec's weights), so a changed
codec or config never reads stale tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

log = logging.getLogger(__name__)


@dataclass
class TokenSplit:
    """One split of a tokenised corpus: codes ``[N, K, T]``, true frame counts ``[N]`` and captions."""

    codes: torch.Tensor
    lengths: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def codec_fingerprint(codec: torch.nn.Module) -> str:
    """A short hash of the codec's config and quantizer codebooks: what the codes depend on."""
    digest = hashlib.sha256(json.dumps(codec.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(codec.state_dict().items()):
        if "quantizer" in name or "encoder" in name:
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_split(
    cache_dir: str | Path, name: str, key_parts: dict, compute: Callable[[], TokenSplit]
) -> TokenSplit:
    """Load split ``name`` from the cache, or ``compute`` and store it."""
    path = Path(cache_dir).expanduser() / "tokens" / f"{name}-{cache_key(key_parts)}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            captions = json.loads(handle.metadata()["captions"])
        log.info("Loaded %d cached %s clips from %s", len(captions), name, path)
        return TokenSplit(tensors["codes"].long(), tensors["lengths"].long(), captions)
    split = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {"codes": split.codes.to(torch.int32).contiguous(), "lengths": split.lengths.to(torch.int32)},
        str(tmp),
        metadata={"captions": json.dumps(split.captions), "key": json.dumps(key_parts, default=str)},
    )
    tmp.replace(path)  # atomic: an interrupted run never leaves a half-written cache entry
    log.info("Cached %d %s clips at %s", len(split), name, path)
    return split
