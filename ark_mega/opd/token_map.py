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
        return _lookup(self.t2s, teacher_ids)

    def to_teacher(self, student_ids: torch.Tensor) -> torch.Tensor:
        return _lookup(self.s2t, student_ids)


def _lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    table = table.to(ids.device)
    ok = (ids >= 0) & (ids < table.numel())
    return torch.where(ok, table[ids.clamp(0, table.numel() - 1)], torch.full_like(ids, -1))


def align_by_characters(student_offsets: list[tuple[int, int]],
                        teacher_offsets: list[tuple[int, int]]) -> list[int]:
    """For each student token, the index of the teacher token starting at the same character
    (-1 if none). Offsets are (start, end) character spans of one text."""
    teacher_start = {}
    for j, (start, end) in enumerate(teacher_offsets):
        if end > start:
            teacher_start.setdefault(start, j)
    return [teacher_start.get(start, -1) if end > start else -1 for start, end in student_offsets]
