"""Residual add and RMSNorm in one launch, for the decoding step.

A decoder layer adds its attention output to the residual stream and normalises the sum for its
MLP, then adds the MLP output and normalises for the next layer. At a decoding batch (64 rows
of ~1,000 values) each of those is a launch that moves ~100 KB: its time is the launch's, so
the pair is one kernel here. Rounding as torch's: the sum is rounded to the residual's dtype
before it is normalised, and x * rsqrt(mean(x^2) + eps) * weight is formed in float32 and
rounded once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import next_pow2, use_triton


def add_rms_norm_reference(hidden, delta, weight, eps):
    total = hidden + delta
    return total, F.rms_norm(total, total.shape[-1:], weight, eps)


@triton.jit
def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, width, eps,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    at = row * width + cols
    dtype = sum_ptr.dtype.element_ty
    h = tl.load(h_ptr + at, mask=inside, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + at, mask=inside, other=0.0).to(tl.float32)
    total = (h + d).to(dtype)
    tl.store(sum_ptr + at, total, mask=inside)
    x = total.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / width + eps)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + at, (x * rstd * w).to(dtype), mask=inside)


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float | None, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, RMSNorm of it with `weight` [H]) for hidden, delta [..., H] of one
    dtype; `eps` None is the dtype's machine epsilon, as torch's."""
    if hidden.shape != delta.shape or hidden.dtype != delta.dtype:
        raise ValueError(f"hidden {tuple(hidden.shape)} {hidden.dtype} and delta "
                         f"{tuple(delta.shape)} {delta.dtype} must match")
    if weight.shape != hidden.shape[-1:]:
        raise ValueError(f"norm weight {tuple(weight.shape)} does not fit hidden width "
                         f"{hidden.shape[-1]}")
    if not use_triton(impl, hidden):
        return add_rms_norm_reference(hidden, delta, weight, eps)
    width = hidden.shape[-1]
    hidden, delta = hidden.contiguous(), delta.contiguous()
    total, normed = torch.empty_like(hidden), torch.empty_like(hidden)
    eps = torch.finfo(hidden.dtype).eps if eps is None else eps
    _add_rms_norm_kernel[(hidden.numel() // width,)](
        hidden, delta, weight, total, normed, width, eps, BLOCK=next_pow2(width),
        num_warps=4)
    return total, normed
