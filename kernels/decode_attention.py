"""Attention of one decoding step, with the step's RoPE and KV-cache write: one launch per layer.

The step's query heads [1, b, groups, per_group, hn] and key and value heads [1, b, groups, hn]
(views of the layer's one QKV projection: megatron's own split copies the query heads) are
rotated at `position` (a device tensor [1]; half-split RoPE on the first `rot` dims, as
megatron's, `kernels/rope.py`); the rotated key and the value go into the cache
[b, groups, max_len, hn] there; each query then attends to the cache up to and including the
position, under an additive bias [b, 1, 1, max_len] (0, or -inf at padding; the same for the
whole rollout: positions after the step's are masked here). Keys are cached
rotated, so a step rotates one key per layer, not the whole cache.

Written as separate launches this was a copy of the query heads, a RoPE-and-write kernel and
the attention. The kernel: programs per (row, key group, split of the cache's positions) rotate
that group's query heads, stream their split's positions once, a block at a time, with an online
softmax, the group's query heads being the rows of its tiles; the first split also rotates the
key, writes key and value and takes the new position's score from registers, so nothing is read
back that a program writes. Positions after the step's are never read. With more than one split
a second launch merges the splits' outputs (flash-decoding): at 64 rows and 2 key groups one
program per (row, group) is one per SM, and its loop waits on one block's loads at a time (on an
H100, run 8: ~15 us per layer where a copy reads the 64 rows' cache of a layer in ~5 us).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import dot_precision, next_pow2, use_triton
from .rope import rotate

# cache positions per loop iteration: a [positions, head width] tile of 4,096 elements (8
# warps; heads of 128 in blocks of 64 took 240 registers, tools/compile_kernels.py)
TILE = 4096
# programs per SM the cache's splits aim at (`_splits`)
PROGRAMS_PER_SM = 4


def decode_attention_reference(query, key, value, cos, sin, position, keys, values, bias, scale):
    _, b, groups, per_group, hn = query.shape
    at = (cos.index_select(0, position), sin.index_select(0, position))  # [1, rot]
    keys.index_copy_(2, position, rotate(key, *at).permute(1, 2, 0, 3))
    values.index_copy_(2, position, value.permute(1, 2, 0, 3))
    bias = bias.masked_fill(torch.arange(keys.shape[2], device=bias.device) > position,
                            float("-inf"))
    # each key group's query heads are its query positions: the cache is read once, not
    # expanded to the query heads
    out = F.scaled_dot_product_attention(rotate(query[0], *at), keys, values, attn_mask=bias,
                                         scale=scale)
    return out.reshape(1, b, groups * per_group * hn)


@triton.jit(do_not_specialize=["max_len"])
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, keys_ptr,
                             values_ptr, bias_ptr, out_ptr, part_ptr, stat_ptr, q_sb, q_sg, q_sh,
                             k_sb, k_sg, v_sb, v_sg, groups, per_group, max_len, hn, rot,
                             bias_stride, scale, HP: tl.constexpr, HN: tl.constexpr,
                             BLOCK: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    row = tl.program_id(0)
    group = tl.program_id(1)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    pos = tl.load(pos_ptr)
    dtype = out_ptr.dtype.element_ty
    i = tl.arange(0, HP)
    d = tl.arange(0, HN)
    in_d = d < hn
    # x cos + rotate_half(x) sin as one product per column: column d's partner is d + rot/2 in
    # the first half (taken negated), d - rot/2 in the second; past `rot`, cos 1 and sin 0
    half = rot // 2
    partner = tl.where(d < half, d + half, tl.where(d < rot, d - half, d))
    c = tl.load(cos_ptr + pos * rot + d, mask=d < rot, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * rot + d, mask=d < rot, other=0.0).to(tl.float32)
    s = tl.where(d < half, -s, s)

    q_at = q_ptr + row * q_sb + group * q_sg + i[:, None] * q_sh
    q_in = (i[:, None] < per_group) & in_d[None, :]
    q = (tl.load(q_at + d[None, :], mask=q_in, other=0.0).to(tl.float32) * c[None, :]
         + tl.load(q_at + partner[None, :], mask=q_in, other=0.0).to(tl.float32) * s[None, :])
    # rounded once to the activations' dtype, as the cached keys are (megatron's torch RoPE
    # rounds after each product: the two differ within a rounding step)
    q = q.to(dtype)
    cache = (row * groups + group).to(tl.int64) * max_len
    if split == 0:
        # the first split writes the step's key and value and starts from the step's own
        # position (from registers): a finite start. The others start empty and never read
        # the position, so no program reads what another writes.
        k_at = k_ptr + row * k_sb + group * k_sg
        k = (tl.load(k_at + d, mask=in_d, other=0.0).to(tl.float32) * c
             + tl.load(k_at + partner, mask=in_d, other=0.0).to(tl.float32) * s).to(dtype)
        v = tl.load(v_ptr + row * v_sb + group * v_sg + d, mask=in_d, other=0.0)
        tl.store(keys_ptr + (cache + pos) * hn + d, k, mask=in_d)
        tl.store(values_ptr + (cache + pos) * hn + d, v, mask=in_d)
        best = (tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1) * scale
                + tl.load(bias_ptr + row * bias_stride + pos).to(tl.float32))
        total = tl.full([HP], 1.0, dtype=tl.float32)
        acc = tl.zeros([HP, HN], dtype=tl.float32) + v.to(tl.float32)[None, :]
    else:
        best = tl.full([HP], float("-inf"), dtype=tl.float32)
        total = tl.zeros([HP], dtype=tl.float32)
        acc = tl.zeros([HP, HN], dtype=tl.float32)
    # the positions before the step's, in whole blocks, shared evenly by the splits (from the
    # step's position, not the cache's length: a rollout that stops early never fills it)
    chunk = tl.cdiv(tl.cdiv(pos, n_splits), BLOCK) * BLOCK
    lo = split * chunk
    hi = tl.minimum(lo + chunk, pos)
    for start in range(lo, hi, BLOCK):
        j = start + tl.arange(0, BLOCK)
        kv_at = (cache + j)[:, None] * hn + d[None, :]
        kv_in = (j[:, None] < hi) & in_d[None, :]
        keys = tl.load(keys_ptr + kv_at, mask=kv_in, other=0.0)
        vals = tl.load(values_ptr + kv_at, mask=kv_in, other=0.0)
        bias = tl.load(bias_ptr + row * bias_stride + j, mask=j < hi, other=float("-inf"))
        scores = (tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale
                  + bias.to(tl.float32)[None, :])
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        # a split whose keys so far are all padding: shift by 0, not -inf (-inf - -inf is NaN)
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)
        p = tl.exp(scores - shift[:, None])
        shrink = tl.exp(best - shift)
        total = total * shrink + tl.sum(p, axis=1)
        acc = acc * shrink[:, None] + tl.dot(p.to(vals.dtype), vals, input_precision=PRECISION)
        best = new_best
    heads = row * groups * per_group + group * per_group + i  # the output's query heads
    if SPLIT:  # this split's unnormalised output, its maximum and its sum, for the merge
        at = heads * n_splits + split
        tl.store(part_ptr + at[:, None] * HN + d[None, :], acc, mask=q_in)
        tl.store(stat_ptr + at * 2, best, mask=i < per_group)
        tl.store(stat_ptr + at * 2 + 1, total, mask=i < per_group)
    else:
        tl.store(out_ptr + heads[:, None] * hn + d[None, :], (acc / total[:, None]).to(dtype),
                 mask=q_in)


@triton.jit(do_not_specialize=["n_splits"])
def _merge_splits_kernel(part_ptr, stat_ptr, out_ptr, hn, n_splits, HN: tl.constexpr):
    """One program per query head: its splits' outputs merged as an online softmax merges
    blocks. The first split always holds the step's own position, so the maximum is finite."""
    head = tl.program_id(0)
    d = tl.arange(0, HN)
    best = float("-inf")
    total = 0.0
    acc = tl.zeros([HN], dtype=tl.float32)
    for split in range(0, n_splits):
        at = head.to(tl.int64) * n_splits + split
        split_best = tl.load(stat_ptr + at * 2)
        new_best = tl.maximum(best, split_best)
        shrink, grow = tl.exp(best - new_best), tl.exp(split_best - new_best)
        total = total * shrink + tl.load(stat_ptr + at * 2 + 1) * grow
        acc = acc * shrink + tl.load(part_ptr + at * HN + d, mask=d < hn, other=0.0) * grow
        best = new_best
    tl.store(out_ptr + head.to(tl.int64) * hn + d, (acc / total).to(out_ptr.dtype.element_ty),
             mask=d < hn)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, position: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                     scale: float | None, impl: str = "auto",
                     splits: int | None = None) -> torch.Tensor:
    """Query heads [1, b, groups, per_group, hn], key and value [1, b, groups, hn] (head dims
    contiguous, any other strides) rotated at `position` ([1], a device tensor; tables `cos`,
    `sin` [max_len, rot] from `rope_tables`); the rotated key and the value written into
    `keys` / `values` [b, groups, max_len, hn] (contiguous) there; the query's attention over
    the cache up to the position under `bias` [b, 1, 1, max_len] (additive, -inf at padding;
    rows may be strided) -> [1, b, heads * hn].
    `scale` None is 1 / sqrt(hn). The kernel shares the positions before the step's among
    `splits` parts of whole blocks (None: enough for PROGRAMS_PER_SM programs per SM; at most one
    per block of the cache), each attended to by its own programs, and merges them in a second
    launch."""
    _, b, groups, per_group, hn = query.shape
    rot = cos.shape[-1]
    if key.shape != (1, b, groups, hn) or value.shape != key.shape or keys.shape != values.shape \
            or (keys.shape[:2], keys.shape[3]) != ((b, groups), hn):
        raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                         f"{tuple(value.shape)} do not fit the cache {tuple(keys.shape)} / "
                         f"{tuple(values.shape)}")
    if splits is not None and splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    if rot % 2 or rot > hn:
        raise ValueError(f"rotary width {rot} must be even and at most the head width {hn}")
    max_len = keys.shape[2]
    if cos.shape != sin.shape or cos.shape[0] < max_len or bias.shape != (b, 1, 1, max_len):
        raise ValueError(f"RoPE tables {tuple(cos.shape)} / {tuple(sin.shape)} and bias "
                         f"{tuple(bias.shape)} do not fit the cache's {max_len} positions and "
                         f"{b} rows ([>= max_len, rot], [b, 1, 1, max_len])")
    if not use_triton(impl, query):
        return decode_attention_reference(query, key, value, cos, sin, position, keys, values,
                                          bias, scale)
    if any(t.stride(-1) != 1 for t in (query, key, value, bias)) \
            or not all(t.is_contiguous() for t in (keys, values, cos, sin)):
        raise ValueError("decode_attention needs contiguous head dims, bias rows, RoPE tables "
                         "and cache")
    out = torch.empty(1, b, groups * per_group * hn, dtype=query.dtype, device=query.device)
    width = max(16, next_pow2(hn))  # tl.dot's smallest tile side
    block = max(16, TILE // width)
    splits = min(-(-max_len // block), splits or _splits(b * groups, query.device))
    heads = b * groups * per_group
    part = stats = out  # unused without splits
    if splits > 1:
        part = torch.empty(heads, splits, width, dtype=torch.float32, device=query.device)
        stats = torch.empty(heads, splits, 2, dtype=torch.float32, device=query.device)
    _decode_attention_kernel[(b, groups, splits)](
        query, key, value, cos, sin, position, keys, values, bias, out, part, stats,
        query.stride(1), query.stride(2), query.stride(3), key.stride(1), key.stride(2),
        value.stride(1), value.stride(2), groups, per_group, max_len, hn, rot,
        bias.stride(0), 1.0 / math.sqrt(hn) if scale is None else scale,
        HP=max(16, next_pow2(per_group)), HN=width, BLOCK=block, SPLIT=splits > 1,
        PRECISION=dot_precision(query.dtype), num_warps=8)
    if splits > 1:
        _merge_splits_kernel[(heads,)](part, stats, out, hn, splits, HN=width)
    return out


def _splits(programs: int, device: torch.device) -> int:
    """Splits of the cache per (row, key group): a program's loop over its positions keeps one
    block's loads in flight at a time, so one program per SM (64 rows x 2 groups on an H100's
    132) leaves the memory idle most of the time; aim for PROGRAMS_PER_SM programs per SM."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, -(-PROGRAMS_PER_SM * sms // programs))
