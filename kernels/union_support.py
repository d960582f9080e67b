"""Per-position support U_t = teacher top-k ∪ student top-k (valid ids only), teacher scores on it.

Layout of the [N, 2k] outputs: columns [0, k) hold the teacher's ids, columns [k, 2k) the
student's; an entry is valid when its id is >= 0 and did not appear earlier in the row (a
student id already among the teacher's, an unmappable teacher id = -1). Invalid entries have
id -1 and score 0. Teacher scores are the teacher's log-probabilities: its top-k values in the
first half, its values at the student's ids in the second, one kind of score for the whole row.
VUSS (valid union support size) is the mean number of valid entries per row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._backend import next_pow2, use_triton


class UnionSupport(NamedTuple):
    ids: torch.Tensor  # [N, 2k] int64, -1 where invalid
    valid: torch.Tensor  # [N, 2k] bool
    teacher_scores: torch.Tensor  # [N, 2k] float32, 0 where invalid
    vuss: torch.Tensor  # scalar float32


def union_support_reference(teacher_ids, student_ids, teacher_topk_scores,
                            teacher_scores_at_student) -> UnionSupport:
    ids = torch.cat([teacher_ids, student_ids], dim=1)
    scores = torch.cat([teacher_topk_scores, teacher_scores_at_student], dim=1).float()
    earlier = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril(-1)
    seen_before = ((ids[:, :, None] == ids[:, None, :]) & earlier).any(-1)
    valid = (ids >= 0) & ~seen_before
    return UnionSupport(ids.where(valid, -1), valid, scores.where(valid, 0.0),
                        valid.sum(1).float().mean())


@triton.jit(do_not_specialize=["n_rows"])
def _union_kernel(t_ids, s_ids, t_scores, s_scores, out_ids, out_valid, out_scores, n_rows, k,
                  KP: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, KP)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < k)
    src = rows[:, None] * k + cols[None, :]
    t = tl.load(t_ids + src, mask=mask, other=-1)
    s = tl.load(s_ids + src, mask=mask, other=-1)
    # teacher id repeated earlier among the teacher's ids
    earlier = cols[:, None] > cols[None, :]
    t_dup = tl.sum(((t[:, :, None] == t[:, None, :]) & earlier[None, :, :]).to(tl.int32), axis=2) > 0
    # student id among the teacher's (valid) ids, or earlier among the student's
    s_in_t = tl.sum(((s[:, :, None] == t[:, None, :]) & (t[:, None, :] >= 0)).to(tl.int32), axis=2) > 0
    s_dup = tl.sum(((s[:, :, None] == s[:, None, :]) & earlier[None, :, :]).to(tl.int32), axis=2) > 0
    t_ok = (t >= 0) & ~t_dup
    s_ok = (s >= 0) & ~s_in_t & ~s_dup
    dst = rows[:, None] * (2 * k) + cols[None, :]
    tl.store(out_ids + dst, tl.where(t_ok, t, -1), mask=mask)
    tl.store(out_ids + dst + k, tl.where(s_ok, s, -1), mask=mask)
    tl.store(out_valid + dst, t_ok.to(tl.int8), mask=mask)
    tl.store(out_valid + dst + k, s_ok.to(tl.int8), mask=mask)
    ts = tl.load(t_scores + src, mask=mask, other=0.0).to(tl.float32)
    ss = tl.load(s_scores + src, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_scores + dst, tl.where(t_ok, ts, 0.0), mask=mask)
    tl.store(out_scores + dst + k, tl.where(s_ok, ss, 0.0), mask=mask)


def union_support(teacher_ids: torch.Tensor, student_ids: torch.Tensor,
                  teacher_topk_scores: torch.Tensor, teacher_scores_at_student: torch.Tensor,
                  impl: str = "auto") -> UnionSupport:
    """teacher_ids / student_ids: [N, k] int64 (-1: no id); the scores: [N, k] log-probs."""
    if teacher_ids.shape != student_ids.shape:
        raise ValueError(f"teacher ids {tuple(teacher_ids.shape)} and student ids "
                         f"{tuple(student_ids.shape)} must have one shape [N, k]")
    for name, scores in (("teacher top-k scores", teacher_topk_scores),
                         ("teacher scores at the student ids", teacher_scores_at_student)):
        if scores.shape != teacher_ids.shape:
            raise ValueError(f"{name} {tuple(scores.shape)} must have the ids' shape "
                             f"{tuple(teacher_ids.shape)}")
    if not use_triton(impl, teacher_ids):
        return union_support_reference(teacher_ids, student_ids, teacher_topk_scores,
                                       teacher_scores_at_student)
    n, k = teacher_ids.shape
    dev = teacher_ids.device
    ids = torch.empty(n, 2 * k, dtype=torch.int64, device=dev)
    valid = torch.empty(n, 2 * k, dtype=torch.int8, device=dev)
    scores = torch.empty(n, 2 * k, dtype=torch.float32, device=dev)
    kp = next_pow2(k)
    block_n = max(1, min(16, 4096 // (kp * kp)))
    args = [x.contiguous() for x in (teacher_ids, student_ids, teacher_topk_scores,
                                     teacher_scores_at_student)]
    _union_kernel[(triton.cdiv(n, block_n),)](*args, ids, valid, scores, n, k, KP=kp,
                                              BLOCK_N=block_n)
    valid = valid.bool()
    return UnionSupport(ids, valid, scores, valid.sum(1).float().mean())
