"""Student logits at the union ids only: logits[n, u] = hidden[n] · W[ids[n, u]].

The student never forms [N, V] logits in training. With tensor parallelism each rank owns the
vocabulary rows [vocab_start, vocab_start + V_local) of the output layer: it computes the
entries whose ids it owns (zero elsewhere) and one all-reduce completes every row. Backward
gives the hidden-state gradient (all-reduced across the TP group, as for any column-parallel
layer's input) and a row-scattered gradient for this rank's weight shard. Invalid ids (-1) and
ids owned by other ranks give 0.

The weight gradient is a segmented sum: the (row, column) entries are sorted by vocabulary id
and each id's segment is summed by one program and written once. Atomic adds into a float32
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

from ._backend import next_pow2, tuned, use_triton


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
def _row_ids(ids_ptr, n, u, vocab_start, v_local, UP: tl.constexpr):
    """Row n's ids as rows of this shard (`local`), and which of them the shard owns."""
    cols = tl.arange(0, UP)
    ids = tl.load(ids_ptr + n * u + cols, mask=cols < u, other=-1)
    local = ids - vocab_start
    return cols, local, (ids >= 0) & (local >= 0) & (local < v_local)


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, ids_ptr, out_ptr, u, hdim, vocab_start, v_local,
                UP: tl.constexpr, BLOCK_H: tl.constexpr):
    n = tl.program_id(0)
    cols, local, owned = _row_ids(ids_ptr, n, u, vocab_start, v_local, UP)
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
                        UP: tl.constexpr, BLOCK_H: tl.constexpr):
    n = tl.program_id(0)
    cols, local, owned = _row_ids(ids_ptr, n, u, vocab_start, v_local, UP)
    g = tl.load(g_ptr + n * u + cols, mask=owned, other=0.0).to(tl.float32)
    for h0 in range(0, hdim, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        in_h = hs < hdim
        w = tl.load(w_ptr + local[:, None] * hdim + hs[None, :],
                    mask=owned[:, None] & in_h[None, :], other=0.0).to(tl.float32)
        tl.store(gh_ptr + n * hdim + hs,
                 tl.sum(g[:, None] * w, axis=0).to(gh_ptr.dtype.element_ty), mask=in_h)


@tuned([triton.Config({"BLOCK_J": j, "BLOCK_H": h}, num_warps=w)
        for j, h, w in ((8, 256, 4), (8, 512, 4), (16, 256, 4), (8, 1024, 8), (16, 512, 8),
                        (32, 128, 8))],
       key=["hdim"], interpreted=triton.Config({"BLOCK_J": 16, "BLOCK_H": 32}))
@triton.jit
def _grad_weight_kernel(g_ptr, h_ptr, order_ptr, starts_ptr, ends_ptr, rows_ptr, out_ptr,
                        part_ptr, u, hdim, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program i: the sum of g[p] * hidden[p // u] over the sorted flat positions
    p = order[starts[i]:ends[i]], BLOCK_H columns at a time, into row rows[i] of `out` (a
    whole segment) or, for rows[i] = -1 - r, row r of the float32 `part` (one piece of a
    segment split over programs). One program per piece: with random ids most segments hold
    a few entries, and a grid over column blocks too made ~1.2 M mostly-masked programs
    (docs/benchmarks.md, run 5)."""
    i = tl.program_id(0)
    start = tl.load(starts_ptr + i)
    end = tl.load(ends_ptr + i)
    row = tl.load(rows_ptr + i)
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
        if row >= 0:
            tl.store(out_ptr + row * hdim + hs, acc.to(out_ptr.dtype.element_ty), mask=in_h)
        else:
            tl.store(part_ptr + (-1 - row) * hdim + hs, acc, mask=in_h)


# Entries per program of the weight gradient: a segment longer than this (an id in the union
# of most rows, e.g. the stop token) is split into pieces summed by separate programs, then
# its pieces are summed in order. One program over a 16,384-entry segment would take the whole
# gradient's time on one multiprocessor.
SEGMENT_PIECE = 256


def _weight_grad(grad_out, hidden, ids, vocab_start: int, weight) -> torch.Tensor:
    """The weight shard's gradient: per owned id, the sum over its entries, deterministic (each
    sum in one fixed order, in float32), written in the weight's dtype; other rows zero."""
    u, hdim, v_local = ids.shape[1], hidden.shape[1], weight.shape[0]
    local, owned = _local_ids(ids, vocab_start, v_local)
    keys, order = torch.sort(local.where(owned, v_local).flatten(), stable=True)
    seg_ids, counts = torch.unique_consecutive(keys, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    # unowned entries sort last, under the id v_local: their segment gets no program
    pieces = (counts + SEGMENT_PIECE - 1) // SEGMENT_PIECE * (seg_ids < v_local)
    total, split = torch.stack([pieces.sum(), (pieces * (pieces > 1)).sum()]).tolist()
    seg = torch.repeat_interleave(torch.arange(seg_ids.numel(), device=ids.device), pieces,
                                  output_size=total)
    first = torch.cumsum(pieces, 0) - pieces
    piece_start = starts[seg] + (torch.arange(total, device=ids.device) - first[seg]) * SEGMENT_PIECE
    piece_end = torch.minimum(piece_start + SEGMENT_PIECE, starts[seg] + counts[seg])
    is_split = pieces[seg] > 1
    rows = torch.where(is_split, -torch.cumsum(is_split, 0), seg_ids[seg])  # -1 - rank
    grad_w = torch.zeros_like(weight)
    part = torch.empty(max(split, 1), hdim, dtype=torch.float32, device=ids.device)
    if total:
        _grad_weight_kernel[(total,)](grad_out, hidden, order, piece_start, piece_end, rows,
                                      grad_w, part, u, hdim)
    if split:  # each split segment: its pieces (consecutive rows of `part`) summed in order
        whole = (pieces > 1).nonzero()[:, 0]
        ends = torch.cumsum(pieces[whole], 0)
        _grad_weight_kernel[(whole.numel(),)](
            torch.ones(split, device=ids.device), part, torch.arange(split, device=ids.device),
            ends - pieces[whole], ends, seg_ids[whole], grad_w, part, 1, hdim)
    return grad_w


# The forward and hidden-gradient kernels hold a [UP, BLOCK_H] tile of 8,192 weights: 64 per
# thread at 4 warps, which spilled at UP = 64 (255 registers; tools/compile_kernels.py)
TILE_WARPS = 8


def _launch_shape(u: int, hdim: int):
    up = next_pow2(u)
    return up, max(16, min(next_pow2(hdim), 8192 // up))


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
        grad_h = torch.empty(n, hdim, dtype=hidden.dtype, device=hidden.device)
        up, block_h = _launch_shape(u, hdim)
        _grad_hidden_kernel[(n,)](grad_out, weight, ids, grad_h, u, hdim, ctx.vocab_start,
                                  v_local, UP=up, BLOCK_H=block_h, num_warps=TILE_WARPS)
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
