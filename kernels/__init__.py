"""Fused kernels for the OPD loss, installed as `ark_mega.kernels`.

Each op is a Triton kernel with a plain PyTorch reference beside it; `impl="auto"` runs the
kernel on CUDA tensors (and under TRITON_INTERPRET=1) and the reference otherwise. Never
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
