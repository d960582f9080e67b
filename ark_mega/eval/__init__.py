"""Text normalisation and corpus-level CER / WER (jiwer)."""

from .metrics import ErrorRate, error_rate, normalize

__all__ = ["ErrorRate", "error_rate", "normalize"]
