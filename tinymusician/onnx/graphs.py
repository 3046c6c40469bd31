"""The three torch modules that become the ONNX graphs, with the tensor names transformers.js expects.

Each wrapper takes and returns plain tensors (no ``Cache`` objects, no dicts), so the legacy TorchScript
exporter (``dynamo=False``; REFERENCES.md: the dynamo exporter fails on T5, the cached decoder and EnCodec)
can trace it. Wrappers are always ``.eval()``-ed by :func:`export_graph`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import MusicgenForConditionalGeneration
from transformers.cache_utils import EncoderDecoderCache

from tinymusician.onnx.layout import FAST_DECODER_INPUTS, cache_names, past_names, text_kv_names


def text_projection(model: MusicgenForConditionalGeneration) -> nn.Module | None:
    """``enc_to_dec_proj`` when transformers applies it (text and decoder widths differ), else None."""
    uses_proj = (
        model.text_encoder.config.hidden_size != model.decoder.config.hidden_size
        and model.decoder.config.cross_attention_hidden_size is None
    )
    return model.enc_to_dec_proj if uses_proj else None


class TextEncoderGraph(nn.Module):
    """``input_ids``, ``attention_mask`` -> raw T5 ``last_hidden_state`` (projection lives in the decoder)."""

    def __init__(self, model: MusicgenForConditionalGeneration) -> None:
        super().__init__()
        self.text_encoder = model.text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class DecoderGraph(nn.Module):
    """One decoder call: the first step (``with_past=False``) or a cached step, HF's ``(B*K, T)`` layout.

    Projects and masks the raw T5 states exactly as ``MusicgenForConditionalGeneration.forward`` does. The
    cached step still receives ``encoder_hidden_states``: without it transformers skips cross-attention
    silently (REFERENCES.md pitfall), even though the cached encoder keys/values are what it attends to.
    """

    def __init__(self, model: MusicgenForConditionalGeneration, with_past: bool) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.enc_to_dec_proj = text_projection(model)
        self.with_past = with_past
        self.num_layers = model.decoder.config.num_hidden_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        hidden = encoder_hidden_states
        if self.enc_to_dec_proj is not None:
            hidden = self.enc_to_dec_proj(hidden)
        hidden = hidden * encoder_attention_mask[..., None].to(hidden.dtype)
        cache = None
        if self.with_past:
            cache = EncoderDecoderCache([tuple(past[4 * i : 4 * i + 4]) for i in range(self.num_layers)])
        out = self.decoder(
            input_ids=input_ids,
            encoder_hidden_states=hidden,
            encoder_attention_mask=encoder_attention_mask,
            cache=cache,
            use_cache=True,
        )
        present = []
        for layer in range(self.num_layers):
            own = out.cache.self_attention_cache.layers[layer]
            cross = out.cache.cross_attention_cache.layers[layer]
            present += [own.keys, own.values, cross.keys, cross.values]
        return (out.logits, *present)


def _fused(*linears: nn.Linear) -> torch.Tensor:
    """One ``[sum(out), in]`` weight for several bias-free projections of the same input."""
    if any(linear.bias is not None for linear in linears):
        raise ValueError("the ONNX decoder graph expects MusicGen's bias-free projections")
    return torch.cat([linear.weight.detach() for linear in linears], dim=0).clone()


def rows_with_text(encoder_attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B]``: 1 where a row sees any text, 0 for a fully masked one (the unconditional half of guidance)."""
    return (encoder_attention_mask.sum(-1) > 0).to(dtype)


class LeanDecoderGraph(nn.Module):
    """The same decoder call as :class:`DecoderGraph`, written out with MusicGen's own weights.

    transformers' mask and cache machinery traces into hundreds of small shape ops per step, and ONNX Runtime
    spent more time dispatching them than in the int8 matmuls of MusicGen-Small's cached step. This is the
    plain math: summed codebook embeddings + sinusoidal positions, pre-LN blocks with self-attention over the
    cache, cross-attention over the cached (or, on the first step, projected) text states, GELU MLP, the
    codebook heads. Projections of one input are fused into one matmul (q|k|v, cross k|v, the K heads): with
    dynamic int8 each matmul also quantizes its input, so fewer, larger matmuls are faster. Both branches of
    the merged graph use the same fused weights, so they are stored once. Parity with :class:`DecoderGraph`
    is tested on shapes not used at export, fully masked (unconditional) text rows included.
    """

    def __init__(self, model: MusicgenForConditionalGeneration, with_past: bool) -> None:
        super().__init__()
        causal_lm = model.decoder
        decoder = causal_lm.model.decoder
        config = causal_lm.config
        self.embed_tokens = decoder.embed_tokens
        self.register_buffer("positions", decoder.embed_positions.weights.detach().clone(), persistent=False)
        self.layers = decoder.layers
        self.layer_norm = decoder.layer_norm
        self.enc_to_dec_proj = text_projection(model)
        self.with_past = with_past
        self.num_codebooks = config.num_codebooks
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.self_qkv = nn.ParameterList(
            [_fused(lay.self_attn.q_proj, lay.self_attn.k_proj, lay.self_attn.v_proj) for lay in self.layers]
        )
        self.cross_kv = nn.ParameterList(
            [_fused(lay.encoder_attn.k_proj, lay.encoder_attn.v_proj) for lay in self.layers]
        )
        self.heads = nn.Parameter(_fused(*causal_lm.lm_heads))
        self.requires_grad_(False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        scores = torch.matmul(self._split_heads(query), key.transpose(2, 3)) * self.scaling + mask
        probs = torch.softmax(scores, dim=-1)
        if keep is not None:
            probs = probs * keep
        out = torch.matmul(probs, value).transpose(1, 2)
        return out.reshape(query.shape)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``(B*K, T)`` codes -> summed codebook embeddings + the sinusoidal positions ``[T, width]``."""
        codes = input_ids.reshape(-1, self.num_codebooks, input_ids.shape[-1])
        return sum(self.embed_tokens[k](codes[:, k]) for k in range(self.num_codebooks)) + positions

    def text_masks(
        self, encoder_attention_mask: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, ...]:
        """The additive cross-attention mask and, per row, whether any text is visible.

        Text padding is masked out of cross-attention; a fully masked row (the unconditional half of guidance)
        gets a zero output, as torch's SDPA gives (its cached keys/values are zero anyway)."""
        visible = encoder_attention_mask[:, None, None, :].to(dtype)
        has_text = rows_with_text(encoder_attention_mask, dtype)[:, None, None, None]
        return (1.0 - visible) * torch.finfo(dtype).min, has_text

    def text_kv(self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor) -> list:
        """Every layer's cross-attention keys and values of the (projected, masked) text, computed once."""
        text = encoder_hidden_states
        if self.enc_to_dec_proj is not None:
            text = self.enc_to_dec_proj(text)
        text = text * encoder_attention_mask[..., None].to(text.dtype)
        kv = []
        for index in range(len(self.layers)):
            key, value = torch.nn.functional.linear(text, self.cross_kv[index]).chunk(2, dim=-1)
            kv += [self._split_heads(key), self._split_heads(value)]
        return kv

    def attend_text(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, masks: tuple
    ) -> torch.Tensor:
        """Cross-attention of ``query [B, T, width]`` over the text's keys/values ``[B, H, L, D]``."""
        return self._attend(query, key, value, *masks)

    def rest_of_layer(
        self, index: int, hidden: torch.Tensor, cross: tuple[torch.Tensor, torch.Tensor], masks: tuple
    ) -> torch.Tensor:
        """Cross-attention over the text and the MLP of layer ``index`` (after its self-attention)."""
        layer = self.layers[index]
        x = layer.encoder_attn_layer_norm(hidden)
        attended = self.attend_text(layer.encoder_attn.q_proj(x), *cross, masks)
        hidden = hidden + layer.encoder_attn.out_proj(attended)
        x = layer.final_layer_norm(hidden)
        return hidden + layer.fc2(layer.activation_fn(layer.fc1(x)))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The K codebook heads, in HF's ``(B*K, T, V)`` layout."""
        logits = torch.nn.functional.linear(self.layer_norm(hidden), self.heads)  # [B, T, K * V]
        batch, length = logits.shape[:2]
        logits = logits.view(batch, length, self.num_codebooks, -1).transpose(1, 2)
        return logits.reshape(batch * self.num_codebooks, length, -1)

    def forward(
        self,
        input_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        length = input_ids.shape[-1]
        past_len = past[0].shape[2] if self.with_past else 0
        hidden = self.embed(input_ids, self.positions[past_len : past_len + length])
        lowest = torch.finfo(hidden.dtype).min
        # new token i may see cache positions <= past_len + i
        key_pos = torch.arange(past_len + length)
        query_pos = torch.arange(length)[:, None] + past_len
        self_mask = torch.where(key_pos[None, :] <= query_pos, 0.0, lowest)[None, None]
        masks = self.text_masks(encoder_attention_mask, hidden.dtype)
        if not self.with_past:
            text_kv = self.text_kv(encoder_hidden_states, encoder_attention_mask)
        present: list[torch.Tensor] = []
        for index, layer in enumerate(self.layers):
            x = layer.self_attn_layer_norm(hidden)
            query, key, value = torch.nn.functional.linear(x, self.self_qkv[index]).chunk(3, dim=-1)
            key, value = self._split_heads(key), self._split_heads(value)
            if self.with_past:
                key = torch.cat([past[4 * index], key], dim=2)
                value = torch.cat([past[4 * index + 1], value], dim=2)
                cross = past[4 * index + 2], past[4 * index + 3]
            else:
                cross = text_kv[2 * index], text_kv[2 * index + 1]
            hidden = hidden + layer.self_attn.out_proj(self._attend(query, key, value, self_mask))
            hidden = self.rest_of_layer(index, hidden, cross, masks)
            present += [key, value, *cross]
        return (self.logits(hidden), *present)


class InPlaceAttention(torch.autograd.Function):
    """Causal self-attention of new tokens over a fixed-capacity cache that is written in place.

    Exported as ONNX Runtime's ``com.microsoft.GroupQueryAttention`` (kv heads = heads: MusicGen's plain
    multi-head attention) on the packed ``q|k|v`` projection (slicing it apart cost 10 small ops per layer
    and step): the new keys/values go to position ``seqlens_k + 1 - length`` of ``past_*``, and the
    product reads only the first ``total_length`` positions. When ``present_*`` is bound to the same buffer
    as ``past_*`` (IO binding), ONNX Runtime copies nothing: the step no longer concatenates and re-reads a
    growing cache. An int8 cache (``key_scale``/``value_scale`` given, ``[H * D]`` per channel) stores
    ``round(x / scale)``, saturated to int8, and GroupQueryAttention dequantizes it as it reads. ``forward`` is
    the same math in torch (a reference; the exporter uses ``symbolic``).
    """

    @staticmethod
    def forward(ctx, qkv, past_key, past_value, seqlens_k, total_length, key_scale, value_scale,  # noqa: ANN001, ANN205
                num_heads: int, head_dim: int):  # fmt: skip
        query, key, value = qkv.chunk(3, dim=-1)
        batch, length, width = query.shape
        start = int(seqlens_k[0]) + 1 - length

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, num_heads, head_dim).transpose(1, 2)

        def store(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
            if scale is None:
                return split(x).to(dtype)
            return split(torch.round(x / scale)).clamp(-128, 127).to(dtype)

        def load(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
            x = x[:, :, : start + length].to(query.dtype)
            return x if scale is None else x * scale.view(1, num_heads, 1, head_dim)

        present_key, present_value = past_key.clone(), past_value.clone()
        present_key[:, :, start : start + length] = store(key, key_scale, past_key.dtype)
        present_value[:, :, start : start + length] = store(value, value_scale, past_value.dtype)
        keys, values = load(present_key, key_scale), load(present_value, value_scale)
        scores = torch.matmul(split(query), keys.transpose(2, 3)) * head_dim**-0.5
        visible = torch.arange(start + length)[None, :] <= torch.arange(length)[:, None] + start
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        out = torch.matmul(torch.softmax(scores, dim=-1), values).transpose(1, 2)
        return out.reshape(batch, length, width), present_key, present_value

    @staticmethod
    def symbolic(g, qkv, past_key, past_value, seqlens_k, total_length, key_scale, value_scale, num_heads,  # noqa: ANN001, ANN205
                 head_dim):  # fmt: skip
        from torch.onnx import symbolic_helper

        absent = symbolic_helper._optional_input_placeholder_tensor(g)  # packed q|k|v: no key, no value
        quantized: dict = {}
        scales: tuple = ()
        if not symbolic_helper._is_none(key_scale):
            # after cos/sin caches, position ids, attention bias, head sink (all absent): the cache's scales
            scales = (absent,) * 5 + (key_scale, value_scale)
            quantized = {
                "k_quant_type_s": "PER_CHANNEL",
                "v_quant_type_s": "PER_CHANNEL",
                "kv_cache_bit_width_i": 8,
            }
        out, present_key, present_value = g.op(
            "com.microsoft::GroupQueryAttention",
            qkv,
            absent,
            absent,
            past_key,
            past_value,
            seqlens_k,
            total_length,
            *scales,
            num_heads_i=num_heads,
            kv_num_heads_i=num_heads,
            outputs=3,
            **quantized,
        )
        out.setType(  # one third of the packed width
            qkv.type().with_sizes([None, None, num_heads * head_dim])
        )
        present_key.setType(past_key.type())
        present_value.setType(past_value.type())
        return out, present_key, present_value


class TextAttention(torch.autograd.Function):
    """Cross-attention over cached text keys/values with a key padding mask, exported as ONNX Runtime's
    ``com.microsoft.MultiHeadAttention``; ``forward`` is the same math in torch (a reference for tracing)."""

    @staticmethod
    def forward(ctx, query, key, value, key_mask, num_heads: int):  # noqa: ANN001, ANN205
        batch, length, width = query.shape
        heads = query.view(batch, length, num_heads, width // num_heads).transpose(1, 2)
        scores = torch.matmul(heads, key.transpose(2, 3)) * (width // num_heads) ** -0.5
        scores = scores.masked_fill(key_mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        out = torch.matmul(torch.softmax(scores, dim=-1), value).transpose(1, 2)
        return out.reshape(batch, length, width)

    @staticmethod
    def symbolic(g, query, key, value, key_mask, num_heads):  # noqa: ANN001, ANN205
        from torch.onnx import symbolic_helper

        absent = symbolic_helper._optional_input_placeholder_tensor(g)  # no bias
        out = g.op(
            "com.microsoft::MultiHeadAttention", query, key, value, absent, key_mask, num_heads_i=num_heads
        )
        out.setType(query.type())
        return out


CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}


class FastDecoderGraph(LeanDecoderGraph):
    """One decoding step (one new frame per row) over a fixed-capacity self-attention cache updated in place.

    Beside the merged decoder (transformers.js's layout, which returns a concatenated copy of the cache at
    every step), this graph takes each layer's self-attention cache as a ``[B, H, capacity, D]`` buffer that
    the runtime binds as both input and output, and the text's cross-attention keys/values as inputs, computed
    once by :class:`TextKVGraph`. ``seqlens_k`` (int32 ``[B]``) is the number of cached positions (= the new
    frame's position), ``total_sequence_length`` (int32 scalar) that + 1. ``cache_dtype=float16`` stores the
    cache in half precision (half the bytes each step reads; attention then runs in fp16); ``int8`` a quarter,
    per channel with ``kv_scales`` ``[layers, 2 (key, value), H * D]`` (:func:`tinymusician.onnx.kv_cache.
    calibrate_kv_scales`), attention in fp32.
    """

    def __init__(
        self,
        model: MusicgenForConditionalGeneration,
        cache_dtype: str = "float32",
        kv_scales: torch.Tensor | None = None,
    ) -> None:
        super().__init__(model, with_past=True)
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype={cache_dtype!r}: choose from {list(CACHE_DTYPES)}")
        self.cache_dtype = CACHE_DTYPES[cache_dtype]
        width = self.num_heads * self.head_dim
        if (kv_scales is not None) != (cache_dtype == "int8"):
            raise ValueError(
                f"kv_scales are what an int8 cache needs (and only it); cache_dtype={cache_dtype!r}"
            )
        if kv_scales is not None and tuple(kv_scales.shape) != (len(self.layers), 2, width):
            raise ValueError(
                f"kv_scales: shape {tuple(kv_scales.shape)}, expected {(len(self.layers), 2, width)}"
            )
        # layer i's key and value scales at 2i, 2i + 1: one initializer each (indexing one [layers, 2, width]
        # tensor would trace into Gather + Squeeze ops)
        self.kv_scales = None
        if kv_scales is not None:
            self.kv_scales = nn.ParameterList(
                [scale.float().clone() for scale in kv_scales.reshape(-1, width)]
            )
            self.kv_scales.requires_grad_(False)

    def forward(
        self,
        input_ids: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        seqlens_k: torch.Tensor,
        total_sequence_length: torch.Tensor,
        *caches: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        num_layers = len(self.layers)
        own, cross = caches[: 2 * num_layers], caches[2 * num_layers :]
        position = self.positions.index_select(0, seqlens_k[:1].long())
        hidden = self.embed(input_ids, position)
        has_text = rows_with_text(encoder_attention_mask, hidden.dtype)[:, None, None]
        masks = encoder_attention_mask.to(torch.int32), has_text
        present: list[torch.Tensor] = []
        for index, layer in enumerate(self.layers):
            x = layer.self_attn_layer_norm(hidden)
            qkv = torch.nn.functional.linear(x, self.self_qkv[index])
            # the tracer records even a same-type .to() as a Cast; an int8 cache takes fp32 and quantizes itself
            if self.cache_dtype.is_floating_point and self.cache_dtype != qkv.dtype:
                qkv = qkv.to(self.cache_dtype)
            scales = (None, None) if self.kv_scales is None else self.kv_scales[2 * index : 2 * index + 2]
            attended, *cache = InPlaceAttention.apply(
                qkv, own[2 * index], own[2 * index + 1], seqlens_k, total_sequence_length, *scales, self.num_heads,
                self.head_dim,
            )  # fmt: skip
            if attended.dtype != hidden.dtype:
                attended = attended.to(hidden.dtype)
            hidden = hidden + layer.self_attn.out_proj(attended)
            hidden = self.rest_of_layer(index, hidden, (cross[2 * index], cross[2 * index + 1]), masks)
            present += cache
        return (self.logits(hidden), *present)

    def attend_text(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, masks: tuple
    ) -> torch.Tensor:
        """One ``com.microsoft.MultiHeadAttention`` (the text keys/values in ``[B, H, L, D]``, padding as a
        ``[B, L]`` key mask) instead of ~23 reshapes, transposes, matmuls and shape ops per layer and step; a row
        with no visible text gets a zero output, as in :meth:`LeanDecoderGraph.text_masks`."""
        key_mask, has_text = masks
        return TextAttention.apply(query, key, value, key_mask, self.num_heads) * has_text


class TextKVGraph(LeanDecoderGraph):
    """``encoder_hidden_states``, ``encoder_attention_mask`` -> every layer's cross-attention keys and values,
    once per generation, for :class:`FastDecoderGraph`."""

    def __init__(self, model: MusicgenForConditionalGeneration) -> None:
        super().__init__(model, with_past=False)

    def forward(self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor) -> tuple:
        return tuple(self.text_kv(encoder_hidden_states, encoder_attention_mask))


class EncodecDecodeGraph(nn.Module):
    """``audio_codes`` int64 ``[1, B, K, T]`` -> ``audio_values [B, 1, samples]`` (EnCodec decoder only)."""

    def __init__(self, model: MusicgenForConditionalGeneration) -> None:
        super().__init__()
        self.audio_encoder = model.audio_encoder

    def forward(self, audio_codes: torch.Tensor) -> torch.Tensor:
        return self.audio_encoder.decode(audio_codes, [None]).audio_values


@dataclass
class GraphSpec:
    """What to trace: example inputs and the names / dynamic axes transformers.js reads."""

    module: nn.Module
    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


def text_encoder_spec(model: MusicgenForConditionalGeneration) -> GraphSpec:
    # A padded example row: the traced graph must keep the attention-mask path.
    input_ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    mask = (input_ids != 0).long()
    axes = {0: "batch_size", 1: "encoder_sequence_length"}
    return GraphSpec(
        TextEncoderGraph(model),
        (input_ids, mask),
        ["input_ids", "attention_mask"],
        ["last_hidden_state"],
        {"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
    )


def decoder_spec(model: MusicgenForConditionalGeneration, with_past: bool) -> GraphSpec:
    """Example shapes differ from the ones tests check (batch 2, text 5 with padding, 3 cached steps)."""
    config = model.decoder.config
    num_codebooks, heads = config.num_codebooks, config.num_attention_heads
    head_dim = config.hidden_size // heads
    batch, text_len, steps, past_len = 2, 5, 2 if not with_past else 1, 3
    text_hidden = torch.randn(batch, text_len, model.text_encoder.config.hidden_size)
    text_mask = torch.ones(batch, text_len, dtype=torch.long)
    text_mask[1, 3:] = 0
    input_ids = torch.randint(0, config.vocab_size, (batch * num_codebooks, steps))
    args = [input_ids, text_hidden, text_mask]
    names = ["input_ids", "encoder_hidden_states", "encoder_attention_mask"]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size_x_num_codebooks", 1: "decoder_sequence_length"},
        "encoder_hidden_states": {0: "batch_size", 1: "encoder_sequence_length"},
        "encoder_attention_mask": {0: "batch_size", 1: "encoder_sequence_length"},
        "logits": {0: "batch_size_x_num_codebooks", 1: "decoder_sequence_length"},
    }
    num_layers = config.num_hidden_layers
    if with_past:
        for name in past_names(num_layers):
            length = past_len if ".decoder." in name else text_len
            args.append(torch.randn(batch, heads, length, head_dim))
            seq = "past_decoder_sequence_length" if ".decoder." in name else "encoder_sequence_length_out"
            axes[name] = {0: "batch_size", 2: seq}
        names += past_names(num_layers)
    for name in past_names(num_layers, "present"):
        seq = "present_decoder_sequence_length" if ".decoder." in name else "encoder_sequence_length_out"
        axes[name] = {0: "batch_size", 2: seq}
    return GraphSpec(
        LeanDecoderGraph(model, with_past),
        tuple(args),
        names,
        ["logits", *past_names(num_layers, "present")],
        axes,
    )


def text_kv_spec(model: MusicgenForConditionalGeneration) -> GraphSpec:
    config = model.decoder.config
    batch, text_len = 2, 5
    text_mask = torch.ones(batch, text_len, dtype=torch.long)
    text_mask[1, 3:] = 0
    names = text_kv_names(config.num_hidden_layers)
    row = {0: "batch_size", 1: "encoder_sequence_length"}
    return GraphSpec(
        TextKVGraph(model),
        (torch.randn(batch, text_len, model.text_encoder.config.hidden_size), text_mask),
        ["encoder_hidden_states", "encoder_attention_mask"],
        names,
        {
            "encoder_hidden_states": row,
            "encoder_attention_mask": row,
            **{name: {0: "batch_size", 2: "encoder_sequence_length"} for name in names},
        },
    )


def fast_decoder_spec(
    model: MusicgenForConditionalGeneration,
    cache_dtype: str = "float32",
    kv_scales: torch.Tensor | None = None,
) -> GraphSpec:
    """Example: batch 2, text 5 (padded), a cache of capacity 6 holding 3 positions."""
    config = model.decoder.config
    heads, num_layers = config.num_attention_heads, config.num_hidden_layers
    head_dim = config.hidden_size // heads
    batch, text_len, capacity, cached = 2, 5, 6, 3
    text_mask = torch.ones(batch, text_len, dtype=torch.long)
    text_mask[1, 3:] = 0
    graph = FastDecoderGraph(model, cache_dtype, kv_scales)
    own = [
        torch.zeros(batch, heads, capacity, head_dim, dtype=graph.cache_dtype) for _ in range(2 * num_layers)
    ]
    cross = [torch.randn(batch, heads, text_len, head_dim) for _ in range(2 * num_layers)]
    args = (
        torch.randint(0, config.vocab_size, (batch * config.num_codebooks, 1)),
        text_mask,
        torch.full((batch,), cached, dtype=torch.int32),
        torch.tensor(cached + 1, dtype=torch.int32),
        *own,
        *cross,
    )
    cache_in, cache_out = cache_names(num_layers), cache_names(num_layers, "present")
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size_x_num_codebooks"},
        "encoder_attention_mask": {0: "batch_size", 1: "encoder_sequence_length"},
        "seqlens_k": {0: "batch_size"},
        "logits": {0: "batch_size_x_num_codebooks"},
        **{name: {0: "batch_size", 2: "cache_capacity"} for name in cache_in + cache_out},
        **{name: {0: "batch_size", 2: "encoder_sequence_length"} for name in text_kv_names(num_layers)},
    }
    return GraphSpec(
        graph,
        args,
        [*FAST_DECODER_INPUTS, *cache_in, *text_kv_names(num_layers)],
        ["logits", *cache_out],
        axes,
    )


def encodec_decode_spec(model: MusicgenForConditionalGeneration) -> GraphSpec:
    config = model.decoder.config
    codes = torch.randint(0, config.vocab_size, (1, 2, config.num_codebooks, 7))
    return GraphSpec(
        EncodecDecodeGraph(model),
        (codes,),
        ["audio_codes"],
        ["audio_values"],
        {
            "audio_codes": {1: "batch_size", 3: "chunk_length"},
            "audio_values": {0: "batch_size", 2: "audio_length"},
        },
    )


def export_graph(spec: GraphSpec, path: Path, opset: int) -> Path:
    """Trace ``spec`` with the legacy exporter into ``path`` (weights inline; external data only if > 2 GB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    spec.module.eval()
    # Tracer warnings flag Python branches on shapes; the parity tests check the shapes that matter.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
            spec.module,
            spec.args,
            str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return path
