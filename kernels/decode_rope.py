"""RoPE at the decoding position and the KV-cache write, for one decoding step.

Query heads [1, b, np, hn] are rotated; key heads [1, b, ng, hn] are rotated and written with
the value heads into the cache [b, ng, max_len, hn] at `position` (a device tensor [1]). Written
with torch ops (megatron's unfused RoPE: cos, sin, two products, a negation and two
concatenations per tensor, then the copies) that is ~20 kernels per layer and step; the Triton
kernel does it in two launches. Non-interleaved (half-split) RoPE on the first `rot` dims of
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
def _rope_heads_kernel(x_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr, vout_ptr,
                       x_sb, x_sh, v_sb, v_sh, heads, out_len, hn, rot,
                       HALF: tl.constexpr, REST: tl.constexpr, HN: tl.constexpr,
                       IS_KEY: tl.constexpr):
    """Program (row, head): head `head` of row `row` rotated; the query goes to out[row, head],
    a key (and its value) to the cache at [row, head, position]."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    pos = tl.load(pos_ptr)
    half = rot // 2
    i = tl.arange(0, HALF)
    in_half = i < half
    src = x_ptr + row * x_sb + head * x_sh
    x1 = tl.load(src + i, mask=in_half, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + i, mask=in_half, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + pos * rot + i, mask=in_half, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * rot + half + i, mask=in_half, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * rot + i, mask=in_half, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * rot + half + i, mask=in_half, other=0.0).to(tl.float32)
    if IS_KEY:
        dst = out_ptr + ((row * heads + head) * out_len + pos) * hn
    else:
        dst = out_ptr + (row * heads + head) * hn
    dtype = out_ptr.dtype.element_ty
    tl.store(dst + i, (x1 * c1 - x2 * s1).to(dtype), mask=in_half)
    tl.store(dst + half + i, (x2 * c2 + x1 * s2).to(dtype), mask=in_half)
    j = rot + tl.arange(0, REST)  # dims past the rotary part pass unchanged
    tl.store(dst + j, tl.load(src + j, mask=j < hn), mask=j < hn)
    if IS_KEY:
        d = tl.arange(0, HN)
        value = tl.load(v_ptr + row * v_sb + head * v_sh + d, mask=d < hn)
        tl.store(vout_ptr + ((row * heads + head) * out_len + pos) * hn + d, value, mask=d < hn)


def _launch(x, v, cos, sin, position, out, vout, is_key: bool):
    _, b, heads, hn = x.shape
    rot = cos.shape[-1]
    _rope_heads_kernel[(b, heads)](
        x, v, cos, sin, position, out, vout, x.stride(1), x.stride(2),
        v.stride(1), v.stride(2), heads, out.shape[2] if is_key else 1, hn, rot,
        HALF=next_pow2(rot // 2), REST=next_pow2(max(hn - rot, 1)), HN=next_pow2(hn),
        IS_KEY=is_key)


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
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    _launch(query, query, cos, sin, position, out, out, is_key=False)
    _launch(key, value, cos, sin, position, keys, values, is_key=True)
    return out
