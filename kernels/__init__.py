"""Fused kernels for the OPD loss, installed as `ark_mega.kernels`.

Never importable as a top-level `kernels`: transformers probes for an unrelated PyPI package
of that name.
"""
