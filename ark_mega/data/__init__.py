"""Audio data: manifests -> validated lhotse cuts -> features, prompts and packed batches."""

from .batching import (Batch, Collator, CutBatches, SkippedCuts, TokenBudgetSampler, TokenCounter,
                       TokenLimit)
from .features import LogMel
from .manifests import LoadPolicy, ManifestError, SkipReport, in_subset, load_manifest
from .prompts import PromptBuilder, infer_language
from .tokenizer import load_tokenizer, train_bpe_tokenizer

__all__ = ["Batch", "Collator", "CutBatches", "LoadPolicy", "LogMel", "ManifestError",
           "PromptBuilder", "SkipReport", "SkippedCuts", "TokenBudgetSampler", "TokenCounter",
           "TokenLimit", "in_subset", "infer_language", "load_manifest", "load_tokenizer",
           "train_bpe_tokenizer"]
