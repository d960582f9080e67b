"""SFT's cross-entropy straight from the final hidden states, a chunk of positions at a time.

The plain path forms the logits [T, V] and a float32 copy of them for megatron's vocab-parallel
cross-entropy: 0.58 MiB per token at Qwen's 151,936-id vocabulary, 18.5 GiB at 32k tokens. Here
the output layer and the cross-entropy run together over chunks of positions, and each chunk's
gradients (hidden states and output weight) are formed in the forward pass while its logits
exist, as in fused linear cross-entropy: the logits are computed once, never rebuilt, and no
tensor larger than one chunk's float32 logits ([rows, V/tp], at most `CHUNK_BYTES`) or the
float32 weight gradient ([V/tp, H]) ever exists. Backward only scales the stored gradients by
the incoming one, so the loss is a weighted sum over positions (the weights known up front).

With tensor parallelism each rank holds the vocabulary rows [vocab_start, vocab_start + V/tp):
a chunk's logsumexps (`logsumexp_across`, as for the teacher's top-k) and target logits are
combined over the group, and the hidden-state gradient is summed over it like any
column-parallel layer's input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

from .kernels.teacher_topk import logsumexp_across

CHUNK_BYTES = 1 << 28  # float32 logits of one chunk: 256 MiB, 441 positions at V = 151,936


def chunk_rows(v_local: int) -> int:
    return max(1, CHUNK_BYTES // (4 * v_local))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, weights, vocab_start, group, rows):
        local = labels - vocab_start
        owned = (local >= 0) & (local < weight.shape[0])
        local = local.where(owned, 0)
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                  if want_w else None)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], rows):
            h, part = hidden[s:s + rows], slice(s, s + rows)
            z = (h @ weight.t()).float()
            lse = torch.logsumexp(z, dim=-1)
            target = z.gather(1, local[part, None])[:, 0].where(owned[part], 0.0)
            if group is not None:  # the target logit comes from the rank that owns it
                lse = logsumexp_across(lse, group)
                dist.all_reduce(target, group=group)
            w = weights[part].float()
            total += ((lse - target) * w).sum()
            if want_h or want_w:
                # d loss / d z = w * (softmax(z) - onehot(label)), the onehot where the label lives
                g = z.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, local[part, None], -owned[part].float()[:, None])
                g = (g * w[:, None]).to(weight.dtype)
                if want_h:
                    grad_h[part] = g @ weight
                if want_w:
                    grad_w += g.t() @ h  # summed in float32, no float32 copy of the product
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = (grad_h.float() * grad_total).to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_total).to(ctx.weight_dtype)  # one backward: in place
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         weights: torch.Tensor, vocab_start: int = 0, tp_group=None,
                         rows: int | None = None) -> torch.Tensor:
    """sum_t weights[t] * CE_t (a float32 scalar): CE_t the cross-entropy of the logits
    `hidden` [T, H] x `weight`^T against `labels` [T] (global vocabulary ids), where `weight`
    [V_local, H] is this rank's output-layer shard starting at `vocab_start` and `tp_group` holds
    the other shards. Equals megatron's `vocab_parallel_cross_entropy` of the float32 logits,
    weighted and summed, `rows` positions at a time (default: `CHUNK_BYTES` of float32 logits).
    `weights` [T] (the loss mask) must be known before the pass: the gradients are formed in it."""
    if (hidden.dim() != 2 or hidden.shape[1] != weight.shape[1]
            or labels.shape != hidden.shape[:1] or weights.shape != labels.shape):
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels "
                         f"{tuple(labels.shape)} and weights {tuple(weights.shape)} do not fit "
                         f"[T, H], [V, H], [T], [T]")
    if tp_group is not None:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    return _LinearCrossEntropy.apply(hidden, weight, labels, weights.detach(), int(vocab_start),
                                     tp_group, rows or chunk_rows(weight.shape[0]))
