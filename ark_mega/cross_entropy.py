"""SFT's cross-entropy straight from the final hidden states, a chunk of positions at a time.

The plain path forms the logits [T, V] and a float32 copy of them for megatron's vocab-parallel
cross-entropy: 0.58 MiB per token at Qwen's 151,936-id vocabulary, 19 GiB at 32k tokens. Here
the output layer and the cross-entropy run together over chunks of positions: forward keeps only
each position's logsumexp and target logit, backward rebuilds one chunk's logits at a time from
the saved hidden states. No tensor larger than one chunk's float32 logits ([rows, V/tp], at most
`CHUNK_BYTES`) or the float32 weight gradient ([V/tp, H]) ever exists.

With tensor parallelism each rank holds the vocabulary rows [vocab_start, vocab_start + V/tp):
the logsumexps and target logits are combined over the group once per call (not per chunk),
and the hidden-state gradient is summed over it like any column-parallel layer's input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

CHUNK_BYTES = 1 << 28  # float32 logits of one chunk: 256 MiB, 441 positions at V = 151,936


def chunk_rows(v_local: int) -> int:
    return max(1, CHUNK_BYTES // (4 * v_local))


def _combine(lse: torch.Tensor, target: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Logsumexp over the whole vocabulary from each rank's over its shard (max first, so the
    sum of exponentials cannot overflow), and the target logit from the rank that owns it."""
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    total = (lse - top).exp()
    dist.all_reduce(total, group=group)
    dist.all_reduce(target, group=group)
    return top + total.log(), target


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, group, rows):
        v_local = weight.shape[0]
        local = labels - vocab_start
        owned = (local >= 0) & (local < v_local)
        local = local.where(owned, 0)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        target = torch.zeros_like(lse)
        for s in range(0, hidden.shape[0], rows):
            z = (hidden[s:s + rows] @ weight.t()).float()
            lse[s:s + rows] = torch.logsumexp(z, dim=-1)
            at = z.gather(1, local[s:s + rows, None])[:, 0]
            target[s:s + rows] = at.where(owned[s:s + rows], 0.0)
        if group is not None:
            lse, target = _combine(lse, target, group)
        ctx.save_for_backward(hidden, weight, local, owned, lse)
        ctx.rows = rows
        return lse - target

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local, owned, lse = ctx.saved_tensors
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, hidden.shape[0], ctx.rows):
            h = hidden[s:s + ctx.rows]
            # d loss / d z = softmax(z) - onehot(label), the onehot on the rank owning the label
            g = ((h @ weight.t()).float() - lse[s:s + ctx.rows, None]).exp_()
            hit = owned[s:s + ctx.rows].float()
            g.scatter_add_(1, local[s:s + ctx.rows, None], -hit[:, None])
            g = (g * grad_loss[s:s + ctx.rows, None]).to(weight.dtype)
            grad_h[s:s + ctx.rows] = g @ weight
            grad_w += g.t() @ h  # summed in float32, no float32 copy of the product
        return grad_h, grad_w.to(weight.dtype), None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          vocab_start: int = 0, tp_group=None,
                          rows: int | None = None) -> torch.Tensor:
    """Per-position cross-entropy [T] (float32) of the logits `hidden` [T, H] x `weight`^T
    against `labels` [T] (global vocabulary ids), where `weight` [V_local, H] is this rank's
    output-layer shard starting at `vocab_start`; `tp_group` holds the other shards. Equals
    megatron's `vocab_parallel_cross_entropy` of the float32 logits, `rows` positions at a time
    (default: `CHUNK_BYTES` of float32 logits)."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels "
                         f"{tuple(labels.shape)} do not fit [T, H], [V, H], [T]")
    if tp_group is not None:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    return _ChunkedCrossEntropy.apply(hidden, weight, labels, int(vocab_start), tp_group,
                                      rows or chunk_rows(weight.shape[0]))
