"""A decoding step's row-parallel projection (attention output, MLP output) as float32 partial
products over slices of its input, which the residual add + RMSNorm after it sums.

At a decoding batch (64 rows) x W^T streams its weight [N, K] once, and N is the hidden width
(896 for Ark-ASR): in blocks of 32-64 columns that is 14-28 programs, too few to keep the
device's memory busy. So each program also takes one of `splits` slices of K (split-K), and
writes its [rows, block] product in float32. cuBLAS splits K the same way (run 8: 6.6 us, then
1.9 us for its sum, per layer for the MLP's output projection) and sums the slices in a launch
of its own; here `add_rms_norm`, the launch after the projection anyway, sums them, in order.
Forward only, one tensor-parallel rank (at TP > 1 the projection's output is all-reduced).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import dot_precision, tuned, use_triton

# slices of K are whole multiples of this, and so of every BLOCK_K below: no program's block
# reaches into the next slice, and only K's end needs a mask
SLICE_ALIGN = 128


def slice_width(k: int, splits: int) -> int:
    """Columns of K per slice: `splits` consecutive slices of this width cover K (the last may
    be short, and any past K empty)."""
    return -(-k // (splits * SLICE_ALIGN)) * SLICE_ALIGN


@functools.lru_cache(maxsize=None)
def default_splits(n: int, k: int, processors: int) -> int:
    """About one program per processor at 64 columns a program (two where the autotuner takes
    32), no slice narrower than SLICE_ALIGN and none empty."""
    wanted = max(1, min(-(-k // SLICE_ALIGN), processors // -(-n // 64)))
    return -(-k // slice_width(k, wanted))


@functools.lru_cache(maxsize=None)
def processors(device: torch.device) -> int:
    """The device's streaming multiprocessors (1 on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def split_k_linear_reference(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    width = slice_width(x.shape[-1], splits)
    return torch.stack([F.linear(x[..., s * width:(s + 1) * width].float(),
                                 weight[:, s * width:(s + 1) * width].float())
                        for s in range(splits)])


# BLOCK_M 64: a decoding batch's rows in one block; the autotuner picks per (k, n, width) on the
# GPU, once per model (a rollout's batch size changes from step to step: not a key)
CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": n, "BLOCK_K": k}, num_warps=4, num_stages=s)
           for n in (32, 64) for k in (64, 128) for s in (3, 4)]
INTERPRETED = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})
assert all(SLICE_ALIGN % c.kwargs["BLOCK_K"] == 0 for c in [*CONFIGS, INTERPRETED])


@tuned(CONFIGS, key=["k", "n", "width"], interpreted=INTERPRETED)
@triton.jit(do_not_specialize=["rows"])
def _split_k_linear_kernel(x_ptr, w_ptr, out_ptr, rows, k, n, width, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PRECISION: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    start = split * width
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        kk = start + k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * k + kk[None, :],
                    mask=(m[:, None] < rows) & (kk[None, :] < k), other=0.0)
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * k + kk[:, None],
                    mask=(kk[:, None] < k) & (cols[None, :] < n), other=0.0)
        acc = tl.dot(x, w, acc=acc, input_precision=PRECISION)
    at = (split * rows + m[:, None]).to(tl.int64) * n + cols[None, :]
    tl.store(out_ptr + at, acc, mask=(m[:, None] < rows) & (cols[None, :] < n))


def split_k_linear(x: torch.Tensor, weight: torch.Tensor, splits: int | None = None,
                   impl: str = "auto") -> torch.Tensor:
    """x [..., K] through `weight` [N, K] as float32 partial products [splits, ..., N] over
    consecutive slices of K (`slice_width`; their sum is x W^T); `splits` None: about one
    program per processor (`default_splits`). No gradient."""
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.dtype != x.dtype:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} must be [N, K] with "
                         f"K = x's last dim and x's dtype (x {tuple(x.shape)} {x.dtype})")
    n, k = weight.shape
    if splits is None:
        splits = default_splits(n, k, processors(x.device))
    if splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    if not use_triton(impl, x):
        return split_k_linear_reference(x, weight, splits)
    flat, weight = x.reshape(-1, k).contiguous(), weight.contiguous()
    rows = flat.shape[0]
    out = torch.empty(splits, *x.shape[:-1], n, dtype=torch.float32, device=x.device)
    _split_k_linear_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),
                                         triton.cdiv(n, meta["BLOCK_N"]), splits)](
        flat, weight, out, rows, k, n, slice_width(k, splits), PRECISION=dot_precision(x.dtype))
    return out
