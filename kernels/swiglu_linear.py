"""A decoder MLP's first projection and its SwiGLU in one launch, for the decoding step.

silu(x W_gate^T) * (x W_up^T) for x [..., K] and the projection's weight [2F, K] (this rank's
gate rows, then its up rows, as megatron's gated linear_fc1 holds them). At a decoding batch
(64 rows) the projection is a skinny matmul that streams its weight once; cuBLAS's kernel and
the compiled SwiGLU after it are two launches that write and read back the [rows, 2F] product.
Here each program takes the gate and up columns of one block of F together, so the product
never leaves its registers. Formed in float32 and rounded once to x's dtype (megatron's SwiGLU
rounds the product first). Forward only: the decoding step's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import dot_precision, tuned, use_triton


def swiglu_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x.float(), weight.float()).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


# BLOCK_N columns of F per program: at 64 rows and F = 4,864 (Ark-ASR) 16 to 64 give 304 to 76
# programs, each streaming 2 x BLOCK_N weight rows; the autotuner picks on the GPU, once per
# model (not per row count: a rollout's batch size changes from step to step, and each new key
# would be timed again inside a step; up to 64 rows all run one row block)
@tuned([triton.Config({"BLOCK_M": 64, "BLOCK_N": n, "BLOCK_K": k}, num_warps=4, num_stages=s)
        for n in (16, 32, 64) for k in (64, 128) for s in (3, 4)],
       key=["k", "f"],
       interpreted=triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}))
@triton.jit(do_not_specialize=["rows"])
def _swiglu_linear_kernel(x_ptr, w_ptr, out_ptr, rows, k, f, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr):
    # row blocks on the fast axis: those that share a block of weight rows run together
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * k + kk[None, :],
                    mask=(m[:, None] < rows) & (kk[None, :] < k), other=0.0)
        w_in = (kk[:, None] < k) & (n[None, :] < f)
        w_at = w_ptr + n[None, :].to(tl.int64) * k + kk[:, None]  # [BLOCK_K, BLOCK_N]
        gate = tl.dot(x, tl.load(w_at, mask=w_in, other=0.0), acc=gate,
                      input_precision=PRECISION)
        up = tl.dot(x, tl.load(w_at + f * k, mask=w_in, other=0.0), acc=up,
                    input_precision=PRECISION)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + m[:, None].to(tl.int64) * f + n[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(m[:, None] < rows) & (n[None, :] < f))


def swiglu_linear(x: torch.Tensor, weight: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up of `x` [..., K] through `weight` [2F, K] (gate rows first) -> [..., F],
    no gradient."""
    if weight.dim() != 2 or weight.shape[0] % 2 or weight.shape[1] != x.shape[-1] \
            or weight.dtype != x.dtype:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} must be [2F, K] with "
                         f"K = x's last dim and x's dtype (x {tuple(x.shape)} {x.dtype})")
    if not use_triton(impl, x):
        return swiglu_linear_reference(x, weight)
    k, f = x.shape[-1], weight.shape[0] // 2
    flat, weight = x.reshape(-1, k).contiguous(), weight.contiguous()
    out = torch.empty(*x.shape[:-1], f, dtype=x.dtype, device=x.device)
    rows = flat.shape[0]
    _swiglu_linear_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),
                                        triton.cdiv(f, meta["BLOCK_N"]))](
        flat, weight, out, rows, k, f, PRECISION=dot_precision(x.dtype))
    return out
