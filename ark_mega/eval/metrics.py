"""Normalisation and corpus-level error rates.

normalize: Unicode NFKC (full-width forms become half-width), lower case, punctuation and
symbols removed (ASCII and CJK: every Unicode P* and S* character; removed, not made a space, so
"don't" and "o'clock" stay one word, as in the paper's scoring), whitespace collapsed. CER is
computed on characters with spaces removed (Mandarin), WER on words. Corpus rates sum the
edit operations over all utterances and divide by the summed reference lengths; they are not
means of per-utterance rates.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import jiwer


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] not in "PS")
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class ErrorRate:
    metric: str  # "cer" or "wer"
    errors: int  # substitutions + deletions + insertions
    reference_length: int
    utterances: int

    @property
    def rate(self) -> float:
        return self.errors / max(self.reference_length, 1)


def units(text: str, metric: str) -> str:
    """The normalised text as jiwer should see it: characters (spaces dropped) or words."""
    text = normalize(text)
    return text.replace(" ", "") if metric == "cer" else text


def utterance_errors(reference: str, hypothesis: str, metric: str) -> tuple[int, int]:
    """(edit operations, reference length) for one utterance."""
    ref, hyp = units(reference, metric), units(hypothesis, metric)
    n = len(ref) if metric == "cer" else len(ref.split())
    if n == 0:
        return len(hyp) if metric == "cer" else len(hyp.split()), 0
    if metric == "cer":
        out = jiwer.process_characters(ref, hyp)
    else:
        out = jiwer.process_words(ref, hyp)
    return out.substitutions + out.deletions + out.insertions, n


def error_rate(references: list[str], hypotheses: list[str], metric: str) -> ErrorRate:
    if metric not in ("cer", "wer"):
        raise ValueError(f"metric must be cer or wer, got {metric!r}")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references for {len(hypotheses)} hypotheses")
    errors = length = 0
    for r, h in zip(references, hypotheses):
        e, n = utterance_errors(r, h, metric)
        errors += e
        length += n
    return ErrorRate(metric, errors, length, len(references))
