"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

"auto" takes the kernel on CUDA tensors and when Triton's interpreter is on
(TRITON_INTERPRET=1, how the tests run the kernels on the CPU), the reference otherwise.
"""

from __future__ import annotations

import os

import torch

IMPLS = ("auto", "triton", "torch")


def use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl == "triton"
    return tensors[0].is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
