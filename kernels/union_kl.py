"""The OPD loss over the union support (method.md, step 6):

    loss = 1/|T| * sum_{t in T} tau^2 * KL( softmax(z_T,t / tau) || softmax(z_S,t / tau) )

both softmaxes over the valid entries of row t only; T = rows with at least two valid entries.
Gradient (student logits only): tau * (softmax(z_S/tau) - softmax(z_T/tau)) / |T| on valid
entries of rows in T. The kernel computes loss and gradient in one pass over the rows.
`reduction="sum"` leaves out the 1/|T|: the trainer divides by |T| of the whole global batch
(all micro-batches and data-parallel ranks), which one micro-batch cannot know.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import next_pow2, use_triton


def union_kl_rows(student_logits, teacher_scores, valid, tau: float = 1.0):
    """tau^2 * KL per row [N] over its valid entries, and which rows count (>= 2 valid)."""
    neg_inf = torch.finfo(student_logits.dtype).min
    log_q = torch.log_softmax((student_logits / tau).masked_fill(~valid, neg_inf), dim=-1)
    log_p = torch.log_softmax((teacher_scores.to(student_logits.dtype) / tau).masked_fill(~valid, neg_inf), dim=-1)
    kl_rows = (log_p.exp() * (log_p - log_q)).masked_fill(~valid, 0.0).sum(-1) * tau ** 2
    return kl_rows, valid.sum(-1) >= 2


def union_kl_reference(student_logits, teacher_scores, valid, tau: float = 1.0,
                       reduction: str = "mean"):
    kl_rows, counted = union_kl_rows(student_logits, teacher_scores, valid, tau)
    total = (kl_rows * counted).sum()
    return total / counted.sum().clamp(min=1) if reduction == "mean" else total


@triton.jit
def _union_kl_kernel(s_ptr, t_ptr, valid_ptr, kl_ptr, counted_ptr, grad_ptr, n_rows, u, inv_tau,
                     UP: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, UP)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < u)
    offs = rows[:, None] * u + cols[None, :]
    ok = (tl.load(valid_ptr + offs, mask=inside, other=0) != 0) & inside
    s = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32) * inv_tau
    t = tl.load(t_ptr + offs, mask=ok, other=0.0).to(tl.float32) * inv_tau
    n_valid = tl.sum(ok.to(tl.int32), axis=1)
    counted = n_valid >= 2
    # Shift by the row maximum over valid entries; invalid entries are set to 0 after the
    # shift and masked out of every sum, so no -inf ever enters the arithmetic.
    s = tl.where(ok, s - tl.max(tl.where(ok, s, float("-inf")), axis=1)[:, None], 0.0)
    t = tl.where(ok, t - tl.max(tl.where(ok, t, float("-inf")), axis=1)[:, None], 0.0)
    s_exp = tl.where(ok, tl.exp(s), 0.0)
    t_exp = tl.where(ok, tl.exp(t), 0.0)
    s_sum = tl.maximum(tl.sum(s_exp, axis=1), 1e-30)
    t_sum = tl.maximum(tl.sum(t_exp, axis=1), 1e-30)
    log_q = s - tl.log(s_sum)[:, None]
    log_p = t - tl.log(t_sum)[:, None]
    p = t_exp / t_sum[:, None]
    q = s_exp / s_sum[:, None]
    kl = tl.sum(tl.where(ok, p * (log_p - log_q), 0.0), axis=1)
    tau = 1.0 / inv_tau
    tl.store(kl_ptr + rows, tl.where(counted, kl * tau * tau, 0.0), mask=rows < n_rows)
    tl.store(counted_ptr + rows, counted.to(tl.int32), mask=rows < n_rows)
    grad = tl.where(ok & counted[:, None], (q - p) * tau, 0.0)
    tl.store(grad_ptr + offs, grad, mask=inside)


class _UnionKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_scores, valid, tau, reduction):
        n, u = student_logits.shape
        kl = torch.empty(n, dtype=torch.float32, device=student_logits.device)
        counted = torch.empty(n, dtype=torch.int32, device=student_logits.device)
        grad = torch.empty(n, u, dtype=torch.float32, device=student_logits.device)
        up = next_pow2(u)
        block_n = max(1, min(64, 8192 // up))
        _union_kl_kernel[(triton.cdiv(n, block_n),)](
            student_logits.contiguous(), teacher_scores.contiguous(), valid.contiguous(), kl,
            counted, grad, n, u, 1.0 / tau, UP=up, BLOCK_N=block_n)
        count = counted.sum().clamp(min=1) if reduction == "mean" else kl.new_ones(())
        ctx.save_for_backward(grad, count)
        ctx.dtype = student_logits.dtype
        return (kl.sum() / count).to(student_logits.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad, count = ctx.saved_tensors
        return (grad * (grad_out / count)).to(ctx.dtype), None, None, None, None


def union_kl(student_logits: torch.Tensor, teacher_scores: torch.Tensor, valid: torch.Tensor,
             tau: float = 1.0, impl: str = "auto", reduction: str = "mean") -> torch.Tensor:
    """Scalar OPD loss, the mean over the rows that count (or their `sum`); gradient flows to
    `student_logits` [N, U] only."""
    if not (student_logits.shape == teacher_scores.shape == valid.shape):
        raise ValueError("student logits, teacher scores and valid mask must share one [N, U] shape")
    if tau <= 0:
        raise ValueError(f"temperature must be positive, got {tau}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    if not use_triton(impl, student_logits):
        return union_kl_reference(student_logits, teacher_scores, valid.bool(), tau, reduction)
    return _UnionKL.apply(student_logits, teacher_scores.detach(), valid.bool(), float(tau),
                          reduction)
