"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

"auto" takes the kernel on CUDA tensors and when Triton's interpreter is on
(TRITON_INTERPRET=1, how the tests run the kernels on the CPU), the reference otherwise. And
which launch configuration a kernel runs: `tuned`.

Integer arguments that change from batch to batch (row and token counts) are declared
`do_not_specialize` in each kernel: Triton otherwise compiles a kernel again for each new
pattern of their values (divisible by 16 or not, equal to 1), about a second each, inside the
first steps of a run.
"""

from __future__ import annotations

import os

import torch
import triton

IMPLS = ("auto", "triton", "torch")


def use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl == "triton"
    return tensors[0].is_cuda or interpreting()


def compiled_only(tensor: torch.Tensor) -> str:
    """The impl for a kernel that runs inside whole models: the kernel on a GPU, the reference
    elsewhere, also under the interpreter (one program per token or row, head, layer and step
    is too slow there; tests/test_kernels.py checks the kernels themselves)."""
    return "triton" if tensor.is_cuda else "torch"


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input precision: exact float32 products for float32 inputs (the tests compare
    them with float64), the tensor cores' own for bf16 / fp16."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_TUNED = []  # every kernel made by `tuned`


def tuned(configs: list[triton.Config], key: list[str], interpreted: triton.Config):
    """Autotune a kernel over `configs` on a GPU: Triton times each on first use, once per
    distinct value of the `key` arguments, and keeps the timings in its cache directory: a
    later process (a requeued job, the next stage) reads them instead of timing again. The
    interpreter has no timings to compare and runs `interpreted`: small enough that the kernel
    tests' shapes cover every loop, large enough that whole training steps under the
    interpreter (trainer tests, gpu_check --smoke) stay quick."""
    def wrap(fn):
        kernel = triton.autotune(configs=[interpreted] if interpreting() else configs,
                                 key=key, cache_results=True)(fn)
        _TUNED.append(kernel)
        return kernel
    return wrap


def chosen_configs() -> dict[str, str]:
    """The configuration each tuned kernel chose, per key it has run with (for benchmark
    reports; empty under the interpreter, which does not tune)."""
    return {f"{kernel.fn.__name__}{list(key)}": str(config)
            for kernel in _TUNED for key, config in getattr(kernel, "cache", {}).items()}
