"""Teacher top-k ids and log-probabilities, and log-probabilities at the student's ids.

log p(v) = z_v - logsumexp(z) over the full vocabulary. From vocab-parallel logits (or from
hidden states and the output-layer shard, one vocabulary chunk at a time) without a float32
log-softmax copy of [N, V]: each shard gives its row logsumexp and its logits at the student
ids in one pass (Triton kernel) and its top-k candidates (torch.topk in the logits' own dtype);
the TP group all-gathers k candidates and the logsumexps per rank, and a final top-k picks
the global top-k.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ._backend import next_pow2, use_triton


class TeacherTopK(NamedTuple):
    ids: torch.Tensor  # [N, k] int64, global vocabulary ids
    logprobs: torch.Tensor  # [N, k] float32
    logprobs_at_student: torch.Tensor  # [N, ks] float32 (student ids outside the vocabulary: -inf)


def teacher_topk_reference(full_logits: torch.Tensor, k: int, student_ids: torch.Tensor) -> TeacherTopK:
    """The definition, on full-vocabulary logits [N, V]."""
    logp = torch.log_softmax(full_logits.float(), dim=-1)
    vals, ids = logp.topk(k, dim=-1)
    inside = (student_ids >= 0) & (student_ids < logp.shape[1])
    at_student = logp.gather(1, student_ids.clamp(0, logp.shape[1] - 1))
    return TeacherTopK(ids, vals, at_student.masked_fill(~inside, float("-inf")))


@triton.jit(do_not_specialize=["chunk_start"])
def _lse_gather_kernel(z_ptr, sid_ptr, lse_ptr, at_ptr, v, ks, chunk_start,
                       BLOCK_V: tl.constexpr, KSP: tl.constexpr):
    n = tl.program_id(0)
    row = z_ptr + n.to(tl.int64) * v  # N * V passes 2^31 at real vocabulary sizes
    m = float("-inf")
    acc = 0.0
    for v0 in range(0, v, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(row + vs, mask=vs < v, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # blocked (-inf) ids alone so far: shift by 0, not by -inf (exp(-inf - -inf) is NaN)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        m = m_new
    tl.store(lse_ptr + n, m + tl.log(acc))
    cols = tl.arange(0, KSP)
    sid = tl.load(sid_ptr + n * ks + cols, mask=cols < ks, other=-1) - chunk_start
    owned = (sid >= 0) & (sid < v) & (cols < ks)
    z_at = tl.load(row + sid, mask=owned, other=0.0).to(tl.float32)
    tl.store(at_ptr + n * ks + cols, z_at, mask=cols < ks)


def _chunk_stats(logits, student_ids, chunk_start: int, impl: str):
    """Row logsumexp [N] (float32) and logits at the student ids this chunk owns [N, ks]
    (0 elsewhere), in one pass over the chunk in its own dtype."""
    n, v = logits.shape
    if not use_triton(impl, logits):
        local = student_ids - chunk_start
        owned = (local >= 0) & (local < v)
        at = logits.gather(1, local.clamp(0, v - 1)).float().masked_fill(~owned, 0.0)
        return torch.logsumexp(logits.float(), dim=-1), at
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    at = torch.empty(student_ids.shape, dtype=torch.float32, device=logits.device)
    _lse_gather_kernel[(n,)](logits.contiguous(), student_ids.contiguous(), lse, at, v,
                             student_ids.shape[1], chunk_start, BLOCK_V=1024,
                             KSP=next_pow2(student_ids.shape[1]))
    return lse, at


class _Running:
    """Streaming merge of vocabulary chunks: logsumexp, top-k candidates, logits at student ids."""

    def __init__(self, n, k, ks, device):
        self.lse = torch.full((n,), float("-inf"), device=device)
        self.vals = torch.full((n, k), float("-inf"), device=device)
        self.ids = torch.full((n, k), -1, dtype=torch.int64, device=device)
        self.at = torch.zeros(n, ks, device=device)
        self.k = k

    def add(self, logits, start, student_ids, impl):
        lse, at = _chunk_stats(logits, student_ids, start, impl)
        self.lse = torch.logaddexp(self.lse, lse)
        self.at += at
        vals, ids = logits.topk(min(self.k, logits.shape[1]), dim=-1)
        self.vals, self.ids = _top_of(torch.cat([self.vals, vals.float()], 1),
                                      torch.cat([self.ids, ids + start], 1), self.k)


def _without(logits, blocked):
    return logits if blocked is None else logits.masked_fill(blocked, float("-inf"))


def _top_of(vals, ids, k):
    top, pick = vals.topk(k, dim=-1)
    return top, ids.gather(1, pick)


def _chunked_topk(logits: torch.Tensor, k: int, chunk: int):
    """torch.topk over a few long rows selects with one thread block per row (64 rows of a
    151,936-id vocabulary on 132 SMs); over many short rows every SM takes part. Chunks of
    `chunk` ids, or of the nearest size that divides the row (2,374 for 151,936 and 2,048),
    else padded with -inf."""
    n, v = logits.shape
    chunk = _chunk_size(v, chunk, k)
    if v % chunk:
        logits = torch.nn.functional.pad(logits, (0, -v % chunk), value=float("-inf"))
    vals, ids = logits.reshape(n, -1, chunk).topk(k, dim=-1)  # [N, chunks, k]
    ids = ids + torch.arange(0, logits.shape[1], chunk, device=ids.device)[:, None]
    vals, ids = _top_of(vals.flatten(1), ids.flatten(1), k)
    # a row with fewer than k unblocked ids may take the padding's -inf over a blocked id's:
    # an id of the row all the same, as one selection's would be
    return vals, ids.clamp_(max=v - 1) if v % chunk else ids


@functools.lru_cache(maxsize=64)
def _chunk_size(v: int, chunk: int, k: int) -> int:
    """A divisor of `v` between half and twice `chunk`, the nearest, else `chunk`; at least k."""
    chunk = min(max(chunk, k), v)
    exact = [c for c in range(max(k, chunk // 2), min(v, 2 * chunk) + 1) if v % c == 0]
    return min(exact, key=lambda c: abs(c - chunk)) if exact else chunk


def _top_across(vals, ids, k, group):
    """The top k (values, global ids) over every rank's k candidates [N, k] in `group`."""
    size = dist.get_world_size(group)
    all_vals = [torch.empty_like(vals) for _ in range(size)]
    all_ids = [torch.empty_like(ids) for _ in range(size)]
    dist.all_gather(all_vals, vals.contiguous(), group=group)
    dist.all_gather(all_ids, ids.contiguous(), group=group)
    return _top_of(torch.cat(all_vals, 1), torch.cat(all_ids, 1), k)


def logsumexp_across(lse: torch.Tensor, group) -> torch.Tensor:
    """Row logsumexps over the whole vocabulary from each rank's over its shard [N]."""
    parts = [torch.empty_like(lse) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, lse, group=group)
    return torch.logsumexp(torch.stack(parts), dim=0)


def teacher_topk(k: int, student_ids: torch.Tensor, logits: torch.Tensor | None = None,
                 hidden: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                 vocab_start: int = 0, tp_group=None, blocked: torch.Tensor | None = None,
                 chunk: int = 16384, impl: str = "auto") -> TeacherTopK:
    """Top-k of the teacher's distribution and its log-probs at `student_ids` [N, ks].

    Give either this rank's vocab-parallel `logits` [N, V_local], or `hidden` [N, H] with the
    output-layer shard `weight` [V_local, H] (logits are then formed `chunk` vocabulary rows at a
    time). `vocab_start` is the global id of the shard's first row; `tp_group` the group whose
    shards make up the vocabulary (None: this shard is the whole vocabulary). `blocked` (bool
    [V_local], this shard's part) removes ids from the distribution before anything is taken.
    """
    if (logits is None) == (hidden is None):
        raise ValueError("give exactly one of logits or hidden (+ weight)")
    if hidden is not None and weight is None:
        raise ValueError("hidden states need the output layer's weight (weight=)")
    v_local = logits.shape[1] if logits is not None else weight.shape[0]
    n = student_ids.shape[0]
    device = student_ids.device
    run = _Running(n, k, student_ids.shape[1], device)
    if logits is not None:
        run.add(_without(logits, blocked), vocab_start, student_ids, impl)
    else:
        for c0 in range(0, v_local, chunk):
            part = hidden @ weight[c0:c0 + chunk].t()
            run.add(_without(part, None if blocked is None else blocked[c0:c0 + chunk]),
                    vocab_start + c0, student_ids, impl)

    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(run.at, group=tp_group)
        run.lse = logsumexp_across(run.lse, tp_group)
        run.vals, run.ids = _top_across(run.vals, run.ids, k, tp_group)
        v_total = v_local * dist.get_world_size(tp_group)
    else:
        v_total = v_local
    inside = (student_ids >= 0) & (student_ids < v_total)
    at = (run.at - run.lse[:, None]).masked_fill(~inside, float("-inf"))
    return TeacherTopK(run.ids, run.vals - run.lse[:, None], at)


def vocab_topk(k: int, logits: torch.Tensor, vocab_start: int = 0, tp_group=None,
               blocked: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Global ids [N, k] of the k largest of vocab-parallel `logits` [N, V_local] (the shard
    starts at `vocab_start`; `blocked`: bool [V_local], ids never taken), best first: what a
    greedy decoding step needs, without the log-probabilities (no logsumexp pass). `chunk`:
    the top k of every `chunk` ids first, then the row's among those (the same ids where the
    values differ; equal values may be taken in another order)."""
    logits = _without(logits, blocked)
    vals, ids = logits.topk(k, dim=-1) if chunk is None else _chunked_topk(logits, k, chunk)
    ids = ids + vocab_start
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        ids = _top_across(vals, ids, k, tp_group)[1]
    return ids
