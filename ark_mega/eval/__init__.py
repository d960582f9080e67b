"""Text normalisation, corpus-level CER / WER (jiwer) and evaluation reports."""

from .metrics import ErrorRate, error_rate, normalize
from .report import PRESETS, Summary, summarize, tables, utterance_rows, write_rows

__all__ = ["ErrorRate", "PRESETS", "Summary", "error_rate", "normalize", "summarize", "tables",
           "utterance_rows", "write_rows"]
