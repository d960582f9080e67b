"""RoPE at the decoding position and the KV-cache write, for one decoding step.

Query heads [1, b, np, hn] are rotated; key heads [1, b, ng, hn] are rotated and written with
the value heads into the cache [b, ng, max_len, hn] at `position` (a device tensor [1]). Written
with torch ops (megatron's unfused RoPE: cos, sin, two products, a negation and two
concatenations per tensor, then the copies) that is ~20 kernels per layer and step; the Triton
kernel does it in one launch. Non-interleaved (half-split) RoPE on the first `rot` dims of
each head, as megatron's (`kernels/rope.py` makes the tables and holds the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import next_pow2, use_triton
from .rope import rotate


def rope_into_cache_reference(query, key, value, cos, sin, position, keys, values):
    at = (cos.index_select(0, position), sin.index_select(0, position))  # [1, rot]
    keys.index_copy_(2, position, rotate(key, *at).permute(1, 2, 0, 3))
    values.index_copy_(2, position, value.permute(1, 2, 0, 3))
    return rotate(query, *at)


@triton.jit
def _rope_heads_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, keys_ptr,
                       values_ptr, q_sb, q_sh, k_sb, k_sh, v_sb, v_sh, heads, groups, max_len, hn,
                       rot, HALF: tl.constexpr, REST: tl.constexpr, HN: tl.constexpr):
    """Program (row, slot): slots [0, heads) rotate that query head of the row into q_out;
    slots [heads, heads + groups) rotate that key head into the cache at [row, group,
    position] and copy its value head there."""
    row = tl.program_id(0)
    slot = tl.program_id(1)
    pos = tl.load(pos_ptr)
    if slot < heads:
        src = q_ptr + row * q_sb + slot * q_sh
        dst = q_out_ptr + (row * heads + slot) * hn
    else:
        group = slot - heads
        src = k_ptr + row * k_sb + group * k_sh
        at = ((row * groups + group) * max_len + pos) * hn
        dst = keys_ptr + at
        d = tl.arange(0, HN)
        value = tl.load(v_ptr + row * v_sb + group * v_sh + d, mask=d < hn)
        tl.store(values_ptr + at + d, value, mask=d < hn)
    half = rot // 2
    i = tl.arange(0, HALF)
    in_half = i < half
    x1 = tl.load(src + i, mask=in_half, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + i, mask=in_half, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + pos * rot + i, mask=in_half, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * rot + half + i, mask=in_half, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * rot + i, mask=in_half, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * rot + half + i, mask=in_half, other=0.0).to(tl.float32)
    dtype = q_out_ptr.dtype.element_ty
    tl.store(dst + i, (x1 * c1 - x2 * s1).to(dtype), mask=in_half)
    tl.store(dst + half + i, (x2 * c2 + x1 * s2).to(dtype), mask=in_half)
    j = rot + tl.arange(0, REST)  # dims past the rotary part pass unchanged
    tl.store(dst + j, tl.load(src + j, mask=j < hn), mask=j < hn)


def rope_into_cache(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, position: torch.Tensor,
                    keys: torch.Tensor, values: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Rotate query [1, b, np, hn] and key [1, b, ng, hn] at `position` ([1], a device tensor;
    tables `cos`, `sin` [max_len, rot] from `rope_tables`); write the rotated key and `value`
    into `keys` / `values` [b, ng, max_len, hn] there. Returns the rotated query [1, b, np, hn].
    Head dims must be contiguous (megatron's q / k / v are views of one projection)."""
    if cos.shape[-1] % 2 or cos.shape[-1] > query.shape[-1]:
        raise ValueError(f"rotary width {cos.shape[-1]} must be even and at most the head "
                         f"width {query.shape[-1]}")
    if not use_triton(impl, query):
        return rope_into_cache_reference(query, key, value, cos, sin, position, keys, values)
    if any(t.stride(-1) != 1 for t in (query, key, value)) or not keys.is_contiguous():
        raise ValueError("rope_into_cache needs contiguous head dims and a contiguous cache")
    _, b, heads, hn = query.shape
    groups, rot = key.shape[2], cos.shape[-1]
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    _rope_heads_kernel[(b, heads + groups)](
        query, key, value, cos, sin, position, out, keys, values, query.stride(1),
        query.stride(2), key.stride(1), key.stride(2), value.stride(1), value.stride(2), heads,
        groups, keys.shape[2], hn, rot, HALF=next_pow2(rot // 2),
        REST=next_pow2(max(hn - rot, 1)), HN=next_pow2(hn))
    return out
