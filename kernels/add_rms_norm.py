"""Residual add and RMSNorm in one launch, for the decoding step.

A decoder layer adds its attention output to the residual stream and normalises the sum for its
MLP, then adds the MLP output and normalises for the next layer. At a decoding batch (64 rows
of ~1,000 values) each of those is a launch that moves ~100 KB: its time is the launch's, so
the pair is one kernel here. The layer's output may come as float32 partial sums of its
projection (`split_k_linear`): they are summed here, in order, and rounded to the residual's
dtype as the projection's own output would be. Rounding as torch's: the sum is rounded to the
residual's dtype before it is normalised, and x * rsqrt(mean(x^2) + eps) * weight is formed in
float32 and rounded once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import next_pow2, use_triton


def whole(hidden: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`delta`, or the sum of its float32 partial sums [parts, ...] rounded to hidden's dtype."""
    return delta.sum(0).to(hidden.dtype) if delta.dim() > hidden.dim() else delta


def add_rms_norm_reference(hidden, delta, weight, eps):
    total = hidden + whole(hidden, delta)
    return total, F.rms_norm(total, total.shape[-1:], weight, eps)


@triton.jit(do_not_specialize=["rows"])
def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, rows, width, parts, eps,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    at = row * width + cols
    dtype = sum_ptr.dtype.element_ty
    h = tl.load(h_ptr + at, mask=inside, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + at, mask=inside, other=0.0).to(tl.float32)
    for part in range(1, parts):  # partial sums [parts, rows, width]: the projection's output
        d += tl.load(d_ptr + (part * rows).to(tl.int64) * width + at, mask=inside, other=0.0)
    total = (h + d.to(dtype).to(tl.float32)).to(dtype)
    tl.store(sum_ptr + at, total, mask=inside)
    x = total.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / width + eps)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + at, (x * rstd * w).to(dtype), mask=inside)


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float | None, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, RMSNorm of it with `weight` [H]) for hidden [..., H] and delta of its
    shape and dtype, or float32 partial sums [parts, ..., H] of delta; `eps` None is the dtype's
    machine epsilon, as torch's."""
    partials = delta.dim() == hidden.dim() + 1 and delta.dtype == torch.float32
    if delta.shape[partials:] != hidden.shape or (delta.dtype != hidden.dtype and not partials):
        raise ValueError(f"delta {tuple(delta.shape)} {delta.dtype} must be hidden's shape and "
                         f"dtype ({tuple(hidden.shape)} {hidden.dtype}), or float32 partial "
                         f"sums of it [parts, ...]")
    if weight.shape != hidden.shape[-1:]:
        raise ValueError(f"norm weight {tuple(weight.shape)} does not fit hidden width "
                         f"{hidden.shape[-1]}")
    if not use_triton(impl, hidden):
        return add_rms_norm_reference(hidden, delta, weight, eps)
    width, rows = hidden.shape[-1], hidden.numel() // hidden.shape[-1]
    hidden, delta = hidden.contiguous(), delta.contiguous()
    total, normed = torch.empty_like(hidden), torch.empty_like(hidden)
    eps = torch.finfo(hidden.dtype).eps if eps is None else eps
    parts = delta.shape[0] if partials else 1
    _add_rms_norm_kernel[(rows,)](hidden, delta, weight, total, normed, rows, width, parts, eps,
                                  BLOCK=next_pow2(width), num_warps=4)
    return total, normed
