"""Attention parts for the local (non-Transformer-Engine) layer specs.

megatron-core's own local `DotProductAttention` rejects packed (THD) sequences, which both the
packed decoder batches and the windowed / per-utterance encoders need. `SDPACoreAttention` is a
drop-in `core_attention` submodule built on `torch.nn.functional.scaled_dot_product_attention`
that takes padded (SBHD) and packed (THD, cu_seqlens) inputs. Packed input on a GPU goes to
torch's variable-length flash attention (one kernel for all segments) where this torch has it
and a probe on the device confirms it; otherwise each segment gets its own SDPA call.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from ..kernels import compiled_only
from ..kernels.rope import packed_rope, rope_tables, tables_at


@dataclass
class PackedSegments(PackedSeqParams):
    """megatron's THD description, with the segment boundaries also on the host: read once per
    forward, not once per layer (each read waits for the GPU). With `rotary` (per-token cos and
    sin [t, rot], from `rope_inputs`) the core attention applies RoPE to its queries and keys:
    megatron's packed RoPE would read the boundaries to the host again in every layer."""

    boundaries: tuple[int, ...] = ()
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None


def rope_inputs(segments: PackedSegments | None, freqs: torch.Tensor, dtype: torch.dtype,
                in_core_attention: bool) -> tuple[PackedSegments | None, torch.Tensor | None]:
    """A megatron block's `packed_seq_params` and `rotary_pos_emb` for RoPE angles `freqs`
    [max_len, 1, 1, rot]. Packed input whose core attention rotates (`in_core_attention`, from
    `rope_in_core_attention`): the segments carry the cos / sin tables at each token's position
    within its segment, and megatron's attention gets no angles. Otherwise megatron's attention
    rotates."""
    if segments is None or not in_core_attention:
        return segments, freqs
    tables = tables_at(*rope_tables(freqs, dtype), segments.boundaries)
    return dataclasses.replace(segments, rotary=tables), None


def rope_in_core_attention(block) -> bool:
    """Whether every layer of megatron TransformerBlock `block` has a core attention that
    applies RoPE to packed queries and keys itself (`rotate_packed`)."""
    return all(getattr(layer.self_attention.core_attention, "rotates_packed_queries", False)
               for layer in block.layers)


def rotate_packed(query: torch.Tensor, key: torch.Tensor, params: PackedSeqParams | None):
    """Packed queries and keys rotated by the tables their `PackedSegments` carry (from
    `rope_inputs`), for a core attention that rotates (`rotates_packed_queries`): one kernel
    per tensor on a GPU; on the CPU the reference, megatron's own ops."""
    rotary = getattr(params, "rotary", None)
    if rotary is None:
        return query, key
    return tuple(packed_rope(x, *rotary, impl=compiled_only(x)) for x in (query, key))


class SDPACoreAttention(MegatronModule):
    """softmax(q k^T * scale + mask) v per head, causal or bidirectional, padded or packed.

    Shapes follow megatron's core-attention contract: SBHD q [s, b, np, hn], k/v [s, b, ng, hn]
    -> [s, b, np * hn]; THD q [t, np, hn], k/v [t, ng, hn] -> [t, np * hn].
    `attention_mask` (SBHD only) is megatron's boolean mask: True where attention is *blocked*.
    """

    rotates_packed_queries = True

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale  # None: 1/sqrt(head_dim), SDPA's default
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params: PackedSeqParams | None = None):
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not take an attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        dropout = self.dropout_p if self.training else 0.0

        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._packed(query, key, value, packed_seq_params, causal, dropout)

        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        mask = None
        if attention_mask is not None:
            mask = ~attention_mask.bool()
            if causal:  # SDPA takes is_causal or a mask, not both
                s_q, s_k = q.shape[2], k.shape[2]
                mask = mask & torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril()
                causal = False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
            scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1],
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _packed(self, query, key, value, params, causal, dropout):
        query, key = rotate_packed(query, key, params)
        if getattr(params, "boundaries", None):
            cu_q = cu_k = list(params.boundaries)
        else:
            cu_q, cu_k = params.cu_seqlens_q.tolist(), params.cu_seqlens_kv.tolist()
        if dropout == 0.0 and cu_q == cu_k and _varlen_usable(query, self.softmax_scale):
            return varlen_attention(query, key, value, params.cu_seqlens_q, cu_q, causal,
                                    self.softmax_scale)
        return per_segment_attention(query, key, value, cu_q, cu_k, causal, self.softmax_scale,
                                     dropout)


def per_segment_attention(query, key, value, cu_q: list[int], cu_k: list[int], causal: bool,
                          scale: float | None, dropout: float = 0.0) -> torch.Tensor:
    """THD attention as one SDPA call per segment: [t, n, d] -> [t, n * d]."""
    outs = []
    for i in range(len(cu_q) - 1):
        # [t_i, n, d] -> [1, n, t_i, d]
        q = query[cu_q[i]:cu_q[i + 1]].transpose(0, 1).unsqueeze(0)
        k = key[cu_k[i]:cu_k[i + 1]].transpose(0, 1).unsqueeze(0)
        v = value[cu_k[i]:cu_k[i + 1]].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=causal, scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        outs.append(o[0].transpose(0, 1))
    out = torch.cat(outs, dim=0)
    return out.reshape(out.shape[0], -1)


def varlen_attention(query, key, value, cu: torch.Tensor, bounds: list[int], causal: bool,
                     scale: float | None) -> torch.Tensor:
    """THD attention as one variable-length flash-attention call (CUDA, bf16 / fp16):
    [t, n, d] -> [t, n * d]. Follows the two signatures torch has had (`is_causal` or
    `window_size`; grouped key / value heads expanded where `enable_gqa` is missing)."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_parameters()
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            group = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    if scale is not None:
        kwargs["scale"] = scale
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    out = varlen_attn(query.contiguous(), key.contiguous(), value.contiguous(), cu, cu,
                      longest, longest, **kwargs)
    return out.reshape(out.shape[0], -1)


@functools.cache
def _varlen_parameters() -> frozenset[str]:
    """The argument names of this torch's varlen_attn (read once, not at every layer)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_usable(query: torch.Tensor, scale: float | None) -> bool:
    head_dim = query.shape[-1]
    return (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
            and head_dim % 8 == 0 and head_dim <= 256
            and _varlen_probe(query.device, query.dtype, scale))


@functools.lru_cache(maxsize=None)
def _varlen_probe(device: torch.device, dtype: torch.dtype, scale: float | None) -> bool:
    """Whether torch's varlen attention runs here, forward and backward, and agrees with the
    per-segment path on a small random case (causal, grouped heads); warns once if not. The
    first call may come from a rollout or a transcription (no_grad): the probe builds its own
    graph, since its answer holds for the whole run."""
    try:
        with torch.inference_mode(False), torch.enable_grad():
            _check_varlen(device, dtype, scale)
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: use the per-segment path
        warnings.warn(f"variable-length flash attention is not usable here ({e!s:.200}); "
                      f"packed attention runs one SDPA call per segment")
        return False


def _check_varlen(device: torch.device, dtype: torch.dtype, scale: float | None) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    bounds = [0, 5, 12, 13]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    q, k, v = (torch.randn(13, n, 64, generator=gen, device=device, dtype=dtype).requires_grad_()
               for n in (4, 2, 2))
    got = varlen_attention(q, k, v, cu, bounds, True, scale)
    grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    ref = per_segment_attention(q, k, v, bounds, bounds, True, scale)
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    for a, b in zip((got, *grads), (ref, *ref_grads)):
        if not torch.allclose(a.float(), b.float(), rtol=3e-2, atol=3e-2):
            raise ValueError("results differ from per-segment SDPA")


class QKVLinearWithoutKeyBias(ColumnParallelLinear):
    """Fused QKV projection whose query and value parts have a bias and whose key part has none.

    The Whisper / GLM-ASR encoder has no key bias. With partial RoPE a key bias would not
    cancel in the softmax, so it must stay exactly zero: the bias is multiplied by a fixed 0/1
    mask, which also zeroes its gradient. Layout per query group (megatron's):
    [q heads of the group | k | v], each head `kv_channels` wide.
    """

    def __init__(self, input_size, output_size, *, config: TransformerConfig, **kwargs):
        kwargs["skip_bias_add"] = True
        kwargs["bias"] = True
        super().__init__(input_size, output_size, config=config, **kwargs)
        hn = config.kv_channels
        q_per_group = config.num_attention_heads // config.num_query_groups
        group_width = (q_per_group + 2) * hn
        groups_here = self.output_size_per_partition // group_width
        group_mask = torch.ones(group_width)
        group_mask[q_per_group * hn:(q_per_group + 1) * hn] = 0.0
        self.register_buffer("bias_mask", group_mask.repeat(groups_here), persistent=False)
        self.key_bias_entries = groups_here * hn  # bias entries held at zero

    def forward(self, input_, weight=None, runtime_gather_output=None):
        out, bias = super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        return out + bias * self.bias_mask.to(bias.dtype), None
