"""Attention of one decoding step against the KV cache.

One query per row and head [1, b, heads, hn] against keys / values [b, groups, max_len, hn] and
an additive bias [b, 1, 1, max_len] (0, or -inf for padded and unwritten positions). The
reference hands each key group's query heads to SDPA as that group's query positions, so the
cache is read once and never expanded to the query heads. On an H100 (docs/benchmarks.md, run
7) cuDNN's kernel for it took ~12.6 us per layer at 64 rows and at 2, where a copy reads the
64 rows' cache of a layer in ~5 us. The kernel: one program per (row, key group) streams that
group's keys and values once, a block of positions at a time, with an online softmax; the
group's query heads are the rows of its tiles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import next_pow2, use_triton

# cache positions per loop iteration: a [positions, head width] tile of 4,096 elements (8
# warps; heads of 128 in blocks of 64 took 240 registers, tools/compile_kernels.py)
TILE = 4096


def cached_attention_reference(query, keys, values, bias, scale):
    _, b, heads, hn = query.shape
    groups = keys.shape[1]
    q = query[0].reshape(b, groups, heads // groups, hn)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale)
    return out.reshape(1, b, heads * hn)


@triton.jit(do_not_specialize=["max_len"])
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, heads, groups, max_len, hn,
                             bias_stride, scale, HP: tl.constexpr, HN: tl.constexpr,
                             BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    row = tl.program_id(0)
    group = tl.program_id(1)
    per_group = heads // groups
    i = tl.arange(0, HP)
    d = tl.arange(0, HN)
    q_at = (row * heads + group * per_group + i)[:, None] * hn + d[None, :]
    q_in = (i[:, None] < per_group) & (d[None, :] < hn)
    q = tl.load(q_ptr + q_at, mask=q_in, other=0.0)
    cache = (row * groups + group).to(tl.int64) * max_len
    # a finite start: a block whose keys are all masked (-inf) then adds exp(-inf) = 0
    best = tl.full([HP], -1e30, dtype=tl.float32)
    total = tl.zeros([HP], dtype=tl.float32)
    acc = tl.zeros([HP, HN], dtype=tl.float32)
    for start in range(0, max_len, BLOCK):
        j = start + tl.arange(0, BLOCK)
        kv_at = (cache + j)[:, None] * hn + d[None, :]
        kv_in = (j[:, None] < max_len) & (d[None, :] < hn)
        k = tl.load(k_ptr + kv_at, mask=kv_in, other=0.0)
        v = tl.load(v_ptr + kv_at, mask=kv_in, other=0.0)
        bias = tl.load(bias_ptr + row * bias_stride + j, mask=j < max_len, other=float("-inf"))
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale + bias.to(tl.float32)[None, :]
        new_best = tl.maximum(best, tl.max(s, axis=1))
        p = tl.exp(s - new_best[:, None])
        shrink = tl.exp(best - new_best)
        total = total * shrink + tl.sum(p, axis=1)
        acc = acc * shrink[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        best = new_best
    out = acc / total[:, None]
    tl.store(out_ptr + q_at, out.to(out_ptr.dtype.element_ty), mask=q_in)


def cached_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     bias: torch.Tensor, scale: float | None, impl: str = "auto") -> torch.Tensor:
    """query [1, b, heads, hn], keys / values [b, groups, max_len, hn] (contiguous), `bias`
    [b, 1, 1, max_len] additive (rows may be strided) -> [1, b, heads * hn]; `scale` None is
    1 / sqrt(hn). Every row needs at least one unmasked key."""
    _, b, heads, hn = query.shape
    groups, max_len = keys.shape[1], keys.shape[2]
    if heads % groups or keys.shape != values.shape or keys.shape[::3] != (b, hn):
        raise ValueError(f"query {tuple(query.shape)} does not fit keys {tuple(keys.shape)} and "
                         f"values {tuple(values.shape)}")
    if not use_triton(impl, query):
        return cached_attention_reference(query, keys, values, bias, scale)
    if not (keys.is_contiguous() and values.is_contiguous()) or bias.stride(-1) != 1:
        raise ValueError("cached_attention needs a contiguous cache and bias rows")
    query = query.contiguous()
    out = torch.empty(1, b, heads * hn, dtype=query.dtype, device=query.device)
    width = max(16, next_pow2(hn))  # tl.dot's smallest tile side
    _decode_attention_kernel[(b, groups)](
        query, keys, values, bias, out, heads, groups, max_len, hn, bias.stride(0),
        1.0 / math.sqrt(hn) if scale is None else scale, HP=max(16, next_pow2(heads // groups)),
        HN=width, BLOCK=max(16, TILE // width),
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=8)
    return out
