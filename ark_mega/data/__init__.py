"""Audio data: manifests -> validated lhotse cuts -> features, prompts and packed batches."""

from .batching import Batch, Collator, CutBatches, TokenBudgetSampler, TokenCounter
from .features import LogMel
from .manifests import LoadPolicy, ManifestError, SkipReport, load_manifest, spread_subset
from .prompts import PromptBuilder, infer_language
from .tokenizer import load_tokenizer, train_bpe_tokenizer

__all__ = ["Batch", "Collator", "CutBatches", "LoadPolicy", "LogMel", "ManifestError",
           "PromptBuilder", "SkipReport", "TokenBudgetSampler", "TokenCounter", "infer_language",
           "load_manifest", "load_tokenizer", "spread_subset", "train_bpe_tokenizer"]
