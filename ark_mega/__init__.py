"""ark_mega: on-policy distillation of compact speech recognisers on megatron-core.

The Triton kernels live in the repository's top-level `kernels/` and install as
`ark_mega.kernels`."""

__version__ = "0.1.0"
