"""Student <-> teacher vocabularies through identical token strings, and position alignment.

When the two tokenizers are the same, every id maps to itself and positions align one to one
(the identity fast path). Otherwise an id maps to the other vocabulary's id of the same token
string (-1 if there is none), the transcript is re-tokenised by the teacher, and a student
position is aligned with the teacher position whose token starts at the same character of the
transcript; student positions without such a teacher position are mismatches (excluded from
the loss, counted).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer


class TokenMap:
    def __init__(self, student: Tokenizer, teacher: Tokenizer, student_vocab_size: int,
                 teacher_vocab_size: int, min_coverage: float = 0.0):
        s_vocab, t_vocab = student.get_vocab(with_added_tokens=True), teacher.get_vocab(
            with_added_tokens=True)
        self.identity = s_vocab == t_vocab and student_vocab_size == teacher_vocab_size
        self.s2t = torch.full((student_vocab_size,), -1, dtype=torch.long)
        self.t2s = torch.full((teacher_vocab_size,), -1, dtype=torch.long)
        for token, sid in s_vocab.items():
            tid = t_vocab.get(token)
            if tid is not None and sid < student_vocab_size and tid < teacher_vocab_size:
                self.s2t[sid], self.t2s[tid] = tid, sid
        self.coverage = (self.s2t[: len(s_vocab)] >= 0).float().mean().item()
        if self.coverage < min_coverage:
            raise ValueError(f"only {100 * self.coverage:.1f}% of the student's tokens have a "
                             f"teacher token with the same string (min_coverage={min_coverage})")

    def to_student(self, teacher_ids: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return teacher_ids
        self.t2s = self.t2s.to(teacher_ids.device)  # once: a copy from pageable memory waits
        return _lookup(self.t2s, teacher_ids)

    def to_teacher(self, student_ids: torch.Tensor) -> torch.Tensor:
        # identity: every id of the shared vocabulary, embedding padding rows included
        if self.identity:
            return student_ids
        self.s2t = self.s2t.to(student_ids.device)
        return _lookup(self.s2t, student_ids)


def _lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    ok = (ids >= 0) & (ids < table.numel())
    return torch.where(ok, table[ids.clamp(0, table.numel() - 1)], torch.full_like(ids, -1))


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte (GPT-2 / Qwen), inverted."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES = _byte_level_alphabet()


def byte_spans(tokenizer: Tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) byte offsets of each token of a byte-level BPE tokenizer in the UTF-8 text
    the ids spell, also for sequences that are not the tokenizer's own encoding of that text
    (a model's rollout)."""
    spans, pos = [], 0
    for i in ids:
        token = tokenizer.id_to_token(i) or ""
        n = sum(1 for ch in token if ch in _BYTES) if token else 0
        spans.append((pos, pos + n))
        pos += n
    return spans


def align_by_characters(student_offsets: list[tuple[int, int]],
                        teacher_offsets: list[tuple[int, int]]) -> list[int]:
    """For each student token, the index of the teacher token starting at the same offset
    (-1 if none). Offsets are (start, end) spans of one text, in bytes or characters."""
    teacher_start = {}
    for j, (start, end) in enumerate(teacher_offsets):
        if end > start:
            teacher_start.setdefault(start, j)
    return [teacher_start.get(start, -1) if end > start else -1 for start, end in student_offsets]
