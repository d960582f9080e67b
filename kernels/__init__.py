"""Triton kernels, installed as `ark_mega.kernels`: the OPD loss (union support, sparse LM head,
union KL, teacher top-k), packed RoPE, and the decoding step's attention, add + RMSNorm, MLP
projection + SwiGLU and output projections split over their input.

Each op has a plain PyTorch reference beside its kernel. The OPD-loss ops' `impl="auto"` runs
the kernel on CUDA tensors (and under TRITON_INTERPRET=1, as the tests do) and the reference
otherwise; the model's ops run through `compiled_only`: the kernel on CUDA tensors, the
reference elsewhere, the interpreter included. Never
importable as a top-level `kernels`: transformers probes for an unrelated PyPI package of that
name.
"""

from ._backend import compiled_only
from .sparse_lm_head import sparse_lm_head
from .teacher_topk import TeacherTopK, teacher_topk
from .union_kl import union_kl
from .union_support import UnionSupport, union_support

__all__ = ["compiled_only", "sparse_lm_head", "teacher_topk", "TeacherTopK", "union_kl",
           "union_support", "UnionSupport"]
