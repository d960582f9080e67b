"""Evaluation reports: per-utterance rows sorted by errors, corpus summaries, presets."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .metrics import error_rate, normalize, units, utterance_errors

# The paper's five test sets: manifest file name (under a data folder) and metric.
PRESETS = {
    "aishell1": ("test_aishell1.jsonl", "cer"),
    "wenet_meeting": ("test_wenet_meeting.jsonl", "cer"),
    "wenet_net": ("test_wenet_net.jsonl", "cer"),
    "libri_clean": ("test_libri_clean.jsonl", "wer"),
    "libri_other": ("test_libri_other.jsonl", "wer"),
}


@dataclass
class Summary:
    name: str
    metric: str
    rate: float
    errors: int
    reference_length: int
    utterances: int


def utterance_rows(ids: list[str], references: list[str], hypotheses: list[str],
                   metric: str) -> list[dict]:
    """One row per utterance, the most errors first."""
    rows = []
    for i, r, h in zip(ids, references, hypotheses):
        errors, length = utterance_errors(r, h, metric)
        rows.append({"id": i, "reference": r, "hypothesis": h,
                     "reference_normalized": units(r, metric),
                     "hypothesis_normalized": units(h, metric),
                     "errors": errors, "reference_length": length})
    return sorted(rows, key=lambda x: (-x["errors"], x["id"]))


def summarize(name: str, references: list[str], hypotheses: list[str], metric: str) -> Summary:
    rate = error_rate(references, hypotheses, metric)
    return Summary(name, metric, rate.rate, rate.errors, rate.reference_length, rate.utterances)


def tables(summaries: list[Summary]) -> tuple[str, str]:
    """(plain text, markdown) tables of the summaries."""
    head = ("set", "metric", "rate", "errors", "ref. units", "utterances")
    rows = [(s.name, s.metric.upper(), f"{100 * s.rate:.2f}%", str(s.errors),
             str(s.reference_length), str(s.utterances)) for s in summaries]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *rows])
    md = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                   + ["| " + " | ".join(r) + " |" for r in rows])
    return text, md


def write_rows(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


__all__ = ["PRESETS", "Summary", "normalize", "summarize", "tables", "utterance_rows", "write_rows"]
