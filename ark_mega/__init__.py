"""ark_mega: on-policy distillation of compact speech recognisers on megatron-core."""

__version__ = "0.1.0"
