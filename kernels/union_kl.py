"""The OPD loss over the union support (the paper's Eq. 1 with its forward KL, the default):

    loss = 1/|T| * sum_{t in T} tau^2 * D( p_t, q_t ),
    p_t = softmax(z_T,t / tau), q_t = softmax(z_S,t / tau)

both softmaxes over the valid entries of row t only; T = rows with at least two valid entries.
The divergence D and its gradient in the student logits (valid entries of rows in T, / |T|):

    forward_kl  KL(p || q)                          tau * (q - p)
    reverse_kl  KL(q || p)                          tau * q * (log q - log p - KL(q || p))
    jsd         beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                                                    tau * (1 - beta) * q * (log q - log m - KL(q || m))

The kernel computes loss and gradient in one pass over the rows. `reduction="sum"` leaves out
the 1/|T|: the trainer divides by |T| of the whole global batch (all micro-batches and
data-parallel ranks), which one micro-batch cannot know.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._backend import next_pow2, tuned, use_triton


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def union_kl_rows(student_logits, teacher_scores, valid, tau: float = 1.0,
                  divergence: str = "forward_kl", beta: float = 0.5):
    """tau^2 * D(p, q) per row [N] over its valid entries, and which rows count (>= 2 valid)."""
    neg_inf = torch.finfo(student_logits.dtype).min
    log_q = torch.log_softmax((student_logits / tau).masked_fill(~valid, neg_inf), dim=-1)
    log_p = torch.log_softmax((teacher_scores.to(student_logits.dtype) / tau).masked_fill(~valid, neg_inf), dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        terms = p * (log_p - log_q)
    elif divergence == "reverse_kl":
        terms = q * (log_q - log_p)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
        terms = beta * p * (log_p - log_m) + (1.0 - beta) * q * (log_q - log_m)
    return terms.masked_fill(~valid, 0.0).sum(-1) * tau ** 2, valid.sum(-1) >= 2


def union_kl_reference(student_logits, teacher_scores, valid, tau: float = 1.0,
                       reduction: str = "mean", divergence: str = "forward_kl",
                       beta: float = 0.5):
    kl_rows, counted = union_kl_rows(student_logits, teacher_scores, valid, tau, divergence, beta)
    total = (kl_rows * counted).sum()
    return total / counted.sum().clamp(min=1) if reduction == "mean" else total


# 64 rows at 4 warps spill at a union of 128 (tools/compile_kernels.py): not among the choices
@tuned([triton.Config({"BLOCK_N": n}, num_warps=w) for n, w in ((16, 4), (16, 8), (32, 4),
                                                                 (32, 8), (64, 8))],
       key=["u"], interpreted=triton.Config({"BLOCK_N": 32}))
@triton.jit(do_not_specialize=["n_rows"])
def _union_kl_kernel(s_ptr, t_ptr, valid_ptr, kl_ptr, counted_ptr, grad_ptr, n_rows, u, inv_tau,
                     beta, UP: tl.constexpr, BLOCK_N: tl.constexpr, DIVERGENCE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, UP)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < u)
    offs = rows[:, None] * u + cols[None, :]
    # the three loads are independent (the scores are not masked by `valid`), so they are in
    # flight together; invalid entries are discarded below by `ok`
    ok = (tl.load(valid_ptr + offs, mask=inside, other=0) != 0) & inside
    s = tl.load(s_ptr + offs, mask=inside, other=0.0).to(tl.float32) * inv_tau
    t = tl.load(t_ptr + offs, mask=inside, other=0.0).to(tl.float32) * inv_tau
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
    tau = 1.0 / inv_tau
    if DIVERGENCE == 0:  # forward KL
        kl = tl.sum(tl.where(ok, p * (log_p - log_q), 0.0), axis=1)
        grad = (q - p) * tau
    elif DIVERGENCE == 1:  # reverse KL
        kl = tl.sum(tl.where(ok, q * (log_q - log_p), 0.0), axis=1)
        grad = q * (log_q - log_p - kl[:, None]) * tau
    else:  # JSD(beta): log m = logaddexp(log beta + log p, log(1 - beta) + log q)
        a = log_p + tl.log(beta)
        b = log_q + tl.log(1.0 - beta)
        top = tl.maximum(a, b)
        log_m = top + tl.log(tl.exp(a - top) + tl.exp(b - top))
        kl_qm = tl.sum(tl.where(ok, q * (log_q - log_m), 0.0), axis=1)
        kl = beta * tl.sum(tl.where(ok, p * (log_p - log_m), 0.0), axis=1) + (1.0 - beta) * kl_qm
        grad = (1.0 - beta) * q * (log_q - log_m - kl_qm[:, None]) * tau
    tl.store(kl_ptr + rows, tl.where(counted, kl * tau * tau, 0.0), mask=rows < n_rows)
    tl.store(counted_ptr + rows, counted.to(tl.int32), mask=rows < n_rows)
    tl.store(grad_ptr + offs, tl.where(ok & counted[:, None], grad, 0.0), mask=inside)


def union_kl_kernel(student_logits, teacher_scores, valid, tau: float, divergence: str,
                    beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel alone: per row the counted divergence [N] and whether it counts [N] (int32),
    and the gradient in the student logits [N, U] (float32, not yet divided by |T|)."""
    n, u = student_logits.shape
    kl = torch.empty(n, dtype=torch.float32, device=student_logits.device)
    counted = torch.empty(n, dtype=torch.int32, device=student_logits.device)
    grad = torch.empty(n, u, dtype=torch.float32, device=student_logits.device)
    _union_kl_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        student_logits.contiguous(), teacher_scores.contiguous(), valid.contiguous(), kl,
        counted, grad, n, u, 1.0 / tau, beta, UP=next_pow2(u),
        DIVERGENCE=DIVERGENCES.index(divergence))
    return kl, counted, grad


class _UnionKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_scores, valid, tau, reduction, divergence, beta):
        kl, counted, grad = union_kl_kernel(student_logits, teacher_scores, valid, tau,
                                            divergence, beta)
        count = counted.sum().clamp(min=1) if reduction == "mean" else kl.new_ones(())
        ctx.save_for_backward(grad, count)
        ctx.dtype = student_logits.dtype
        return (kl.sum() / count).to(student_logits.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad, count = ctx.saved_tensors
        return (grad * (grad_out / count)).to(ctx.dtype), None, None, None, None, None, None


def union_kl(student_logits: torch.Tensor, teacher_scores: torch.Tensor, valid: torch.Tensor,
             tau: float = 1.0, impl: str = "auto", reduction: str = "mean",
             divergence: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """Scalar OPD loss, the mean over the rows that count (or their `sum`) of the `divergence`
    (`beta`: the JSD's mixing weight); gradient flows to `student_logits` [N, U] only."""
    if not (student_logits.dim() == 2
            and student_logits.shape == teacher_scores.shape == valid.shape):
        raise ValueError(f"student logits {tuple(student_logits.shape)}, teacher scores "
                         f"{tuple(teacher_scores.shape)} and valid mask {tuple(valid.shape)} "
                         f"must share one [N, U] shape")
    if tau <= 0:
        raise ValueError(f"temperature must be positive, got {tau}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    check_divergence(divergence, beta)
    if not use_triton(impl, student_logits):
        return union_kl_reference(student_logits, teacher_scores, valid.bool(), tau, reduction,
                                  divergence, beta)
    return _UnionKL.apply(student_logits, teacher_scores.detach(), valid.bool(), float(tau),
                          reduction, divergence, float(beta))


def check_divergence(divergence: str, beta: float) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"the JSD's beta must be in (0, 1), got {beta}")
