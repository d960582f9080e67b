"""Student logits at the union ids only: logits[n, u] = hidden[n] · W[ids[n, u]].

The student never forms [N, V] logits in training. With tensor parallelism each rank owns the
vocabulary rows [vocab_start, vocab_start + V_local) of the output layer: it computes the
entries whose ids it owns (zero elsewhere) and one all-reduce completes every row. Backward
gives the hidden-state gradient (all-reduced across the TP group, as for any column-parallel
layer's input) and a row-scattered gradient for this rank's weight shard. Invalid ids (-1) and
ids owned by other ranks give 0.

The weight gradient is a segmented sum: the (row, column) entries are sorted by vocabulary id
and one program per vocabulary row sums its id's segment and writes the row once (zeros for
an id in no union, so the gradient needs no separate fill). Atomic adds into a float32
[V, H] buffer were 3/4 of the fused head's time on an H100 (docs/benchmarks.md), needed that
buffer besides the gradient, and summed in a different order each run; the sorted sum is
deterministic and writes the gradient in the weight's dtype directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
)

from ._backend import next_pow2, use_triton


def _local_ids(ids, vocab_start, v_local):
    local = ids - vocab_start
    owned = (ids >= 0) & (local >= 0) & (local < v_local)
    return local.where(owned, 0), owned


def sparse_logits_reference(hidden, weight, ids, vocab_start: int = 0):
    """This rank's part: hidden [N, H], weight shard [V_local, H], ids [N, U] -> [N, U]."""
    local, owned = _local_ids(ids, vocab_start, weight.shape[0])
    logits = torch.einsum("nh,nuh->nu", hidden, weight[local])
    return logits.masked_fill(~owned, 0.0)


@triton.jit
def _row_ids(ids_ptr, n, u, cols, vocab_start, v_local):
    """Row n's ids at `cols` as rows of this shard (`local`), and which of them the shard owns."""
    ids = tl.load(ids_ptr + n * u + cols, mask=cols < u, other=-1)
    local = ids - vocab_start
    return local, (ids >= 0) & (local >= 0) & (local < v_local)


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, ids_ptr, out_ptr, u, hdim, vocab_start, v_local,
                UP: tl.constexpr, BLOCK_H: tl.constexpr):
    n = tl.program_id(0)
    cols = tl.arange(0, UP)
    local, owned = _row_ids(ids_ptr, n, u, cols, vocab_start, v_local)
    acc = tl.zeros([UP], dtype=tl.float32)
    for h0 in range(0, hdim, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h = tl.load(h_ptr + n * hdim + hs, mask=hs < hdim, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + local[:, None] * hdim + hs[None, :],
                    mask=owned[:, None] & (hs[None, :] < hdim), other=0.0).to(tl.float32)
        acc += tl.sum(w * h[None, :], axis=1)
    tl.store(out_ptr + n * u + cols, acc, mask=cols < u)


@triton.jit
def _grad_hidden_kernel(g_ptr, w_ptr, ids_ptr, gh_ptr, u, hdim, vocab_start, v_local,
                        BLOCK_U: tl.constexpr, BLOCK_H: tl.constexpr):
    """Row n: sum over its ids of g[n, j] * W[ids[n, j]], BLOCK_U ids at a time, each thread
    summing its own columns over the BLOCK_U ids (the launch puts every warp along H)."""
    n = tl.program_id(0)
    for h0 in range(0, hdim, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        in_h = hs < hdim
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for u0 in range(0, u, BLOCK_U):
            cols = u0 + tl.arange(0, BLOCK_U)
            local, owned = _row_ids(ids_ptr, n, u, cols, vocab_start, v_local)
            g = tl.load(g_ptr + n * u + cols, mask=owned, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + local[:, None] * hdim + hs[None, :],
                        mask=owned[:, None] & in_h[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(g[:, None] * w, axis=0)
        tl.store(gh_ptr + n * hdim + hs, acc.to(gh_ptr.dtype.element_ty), mask=in_h)


@triton.jit
def _segment_sum_kernel(g_ptr, h_ptr, order_ptr, starts_ptr, ends_ptr, part_lo_ptr, part_hi_ptr,
                        part_ptr, out_ptr, u, hdim, BLOCK_J: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    """Row i of `out`: the sum of g[p] * hidden[p // u] over the sorted flat positions
    p = order[starts[i]:ends[i]], BLOCK_J at a time, then of the float32 rows
    part[part_lo[i]:part_hi[i]] (the other pieces of a long segment), in that fixed order.
    An empty row is written as zeros. Each thread sums its own columns (warps along H)."""
    i = tl.program_id(0)
    start = tl.load(starts_ptr + i)
    end = tl.load(ends_ptr + i)
    part_lo = tl.load(part_lo_ptr + i)
    part_hi = tl.load(part_hi_ptr + i)
    for h0 in range(0, hdim, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        in_h = hs < hdim
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j0 in range(start, end, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J)
            in_j = js < end
            p = tl.load(order_ptr + js, mask=in_j, other=0)
            g = tl.load(g_ptr + p, mask=in_j, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + (p // u)[:, None] * hdim + hs[None, :],
                        mask=in_j[:, None] & in_h[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(g[:, None] * h, axis=0)
        for q in range(part_lo, part_hi):
            acc += tl.load(part_ptr + q * hdim + hs, mask=in_h, other=0.0)
        tl.store(out_ptr + i * hdim + hs, acc.to(out_ptr.dtype.element_ty), mask=in_h)


# Entries summed by one program of the weight gradient: a longer segment (an id in the union
# of many rows, e.g. the stop token) gets its further pieces summed by other programs into
# float32 rows first. One program over a 16,384-entry segment would take the whole gradient's
# time on one multiprocessor; the float32 rows are allocated for the most pieces there can be,
# N * U / SEGMENT_PIECE + 1 (8.4 MB at N = 16,384, U = 64, H = 1,024).
SEGMENT_PIECE = 512


def _weight_grad(grad_out, hidden, ids, vocab_start: int, weight) -> torch.Tensor:
    """The weight shard's gradient: per row, the sum over its id's entries, deterministic (each
    sum in one fixed order, in float32), written in the weight's dtype; other rows zero. No
    host synchronisation: every size is known on the host, the pieces' number up to a bound."""
    u, hdim, v_local = ids.shape[1], hidden.shape[1], weight.shape[0]
    dev = ids.device
    local, owned = _local_ids(ids, vocab_start, v_local)
    # unowned entries sort last, under the key v_local, outside every row's range
    keys, order = torch.sort(local.where(owned, v_local).flatten().int(), stable=True)
    bounds = torch.searchsorted(keys, torch.arange(v_local + 1, dtype=torch.int32, device=dev))
    starts, ends = bounds[:-1], bounds[1:]
    extra = (ends - starts - 1).clamp(min=0) // SEGMENT_PIECE  # pieces after the row's first
    part_hi = torch.cumsum(extra, 0)
    part_lo = part_hi - extra
    # piece q (q < part_hi[-1]) is piece q - part_lo[r] + 1 of row r; beyond, an empty one
    bound = ids.numel() // SEGMENT_PIECE + 1
    q = torch.arange(bound, device=dev)
    row = torch.searchsorted(part_hi, q, right=True).clamp(max=v_local - 1)
    piece_start = starts[row] + (q - part_lo[row] + 1) * SEGMENT_PIECE
    piece_end = torch.minimum(piece_start + SEGMENT_PIECE, ends[row]).where(q < part_hi[-1], 0)
    part = torch.empty(bound, hdim, dtype=torch.float32, device=dev)
    block_h, warps = _tile(hdim, hidden)
    no_parts = torch.zeros(bound, dtype=torch.int64, device=dev)
    _segment_sum_kernel[(bound,)](grad_out, hidden, order, piece_start, piece_end, no_parts,
                                  no_parts, part, part, u, hdim, BLOCK_J=SUM_BLOCK,
                                  BLOCK_H=block_h, num_warps=warps)
    grad_w = torch.empty_like(weight)
    _segment_sum_kernel[(v_local,)](grad_out, hidden, order, starts,
                                    torch.minimum(ends, starts + SEGMENT_PIECE), part_lo, part_hi,
                                    part, grad_w, u, hdim, BLOCK_J=SUM_BLOCK, BLOCK_H=block_h,
                                    num_warps=warps)
    return grad_w


# The forward kernel's [UP, BLOCK_H] tile of 8,192 weights at 8 warps read its weight rows at
# the copy bandwidth of an H100 (docs/benchmarks.md, run 7)
TILE_WARPS = 8
# Rows (ids, entries) per step of the gradient kernels' sums over the union or a segment
SUM_BLOCK = 8


def _launch_shape(u: int, hdim: int):
    up = next_pow2(u)
    return up, max(16, min(next_pow2(hdim), 8192 // up))


def _tile(hdim: int, rows: torch.Tensor) -> tuple[int, int]:
    """Columns and warps of the gradient kernels' [SUM_BLOCK, columns] tiles of `rows`: 16-byte
    loads, a warp's 32 threads side by side along H and as many warps as fill the columns, so
    each sum over the tile's rows stays within its threads. Summed across warps (through shared
    memory, once per block of H) the hidden gradient took 2.5x the forward's time on an H100."""
    block_h = min(next_pow2(hdim), 1024)
    return block_h, max(1, block_h * rows.element_size() // (16 * 32))


class _SparseLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, vocab_start):
        n, hdim = hidden.shape
        u = ids.shape[1]
        hidden, weight, ids = hidden.contiguous(), weight.contiguous(), ids.contiguous()
        out = torch.empty(n, u, dtype=torch.float32, device=hidden.device)
        up, block_h = _launch_shape(u, hdim)
        _fwd_kernel[(n,)](hidden, weight, ids, out, u, hdim, vocab_start, weight.shape[0],
                          UP=up, BLOCK_H=block_h, num_warps=TILE_WARPS)
        ctx.save_for_backward(hidden, weight, ids)
        ctx.vocab_start = vocab_start
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, ids = ctx.saved_tensors
        n, hdim = hidden.shape
        u, v_local = ids.shape[1], weight.shape[0]
        grad_out = grad_out.contiguous()
        # summed in float32, stored once in the hidden states' dtype (no float32 copy to cast)
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.empty(n, hdim, dtype=hidden.dtype, device=hidden.device)
            block_h, warps = _tile(hdim, weight)
            _grad_hidden_kernel[(n,)](grad_out, weight, ids, grad_h, u, hdim, ctx.vocab_start,
                                      v_local, BLOCK_U=SUM_BLOCK, BLOCK_H=block_h,
                                      num_warps=warps)
        if ctx.needs_input_grad[1]:  # not for a frozen output layer
            grad_w = _weight_grad(grad_out, hidden, ids, ctx.vocab_start, weight)
        return grad_h, grad_w, None, None


def sparse_lm_head(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                   vocab_start: int = 0, tp_group=None, impl: str = "auto") -> torch.Tensor:
    """Logits [N, U] (float32) at global vocabulary `ids` [N, U] from hidden [N, H] and this
    rank's output-layer shard [V_local, H] starting at `vocab_start`.

    With a `tp_group` (the tensor-parallel group holding the other vocabulary rows), the
    partial logits are summed over it (and the hidden-state gradient likewise).
    """
    if hidden.shape[0] != ids.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and ids "
                         f"{tuple(ids.shape)} do not fit [N, H], [V, H], [N, U]")
    if tp_group is not None:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    if use_triton(impl, hidden):
        logits = _SparseLogits.apply(hidden, weight, ids, int(vocab_start))
    else:
        logits = sparse_logits_reference(hidden, weight, ids, vocab_start).float()
    if tp_group is not None:
        logits = reduce_from_tensor_model_parallel_region(logits, group=tp_group)
    return logits
