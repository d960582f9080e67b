"""One gradient pass of each stage over a step's micro-batches: SFT (cross-entropy on
transcripts) and OPD.

Both run through `run_pipeline` (megatron's schedules: gradient accumulation at PP = 1, 1F1B at
PP > 1) and leave the gradients in the model; the trainer steps the optimizer. The loss is one
mean over the scored positions of the whole global batch (all micro-batches of all data-parallel
ranks; the paper's Eq. 1 and SFT's token-level cross-entropy), not a mean of per-rank means: the
global count is all-reduced once per step, before the passes (`GlobalMean`). Metrics are valid
on the last pipeline stage.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps

from ..config import GenerationConfig, OPDSettings
from ..cross_entropy import linear_cross_entropy
from ..data.batching import Batch
from ..data.prompts import PromptBuilder, infer_language
from ..distributed import device, vocab_shard
from ..kernels import sparse_lm_head, union_kl, union_support
from ..kernels.union_kl import union_kl_rows
from ..models.audio_lm import AudioLM
from ..pipeline import run_pipeline
from .generate import generate
from .scoring import packed, packed_rows, score
from .token_map import TokenMap, align_by_characters, byte_spans


@dataclass
class JointCTC:
    """Joint CTC / attention training (ESPnet, WeNet): the SFT loss becomes
    `(1 - weight) * cross-entropy + weight * CTC`, the CTC loss of the model's CTC head on the
    audio embeddings against the transcript's tokens (`encode`), per transcript token. The
    monotonic alignment CTC asks for makes the encoder's output carry the words early on, which
    a tiny model trained from scratch otherwise learns slowly if at all."""

    weight: float
    encode: Callable[[str], list[int]]

    def loss_sum(self, log_probs: torch.Tensor, counts: list[int], texts: list[str]) -> torch.Tensor:
        """The CTC loss summed over the utterances (the caller divides, as for the CE)."""
        targets = [self.encode(t) for t in texts]
        lengths = torch.tensor([len(t) for t in targets])
        flat = torch.tensor([i for t in targets for i in t], dtype=torch.long)
        blank = log_probs.shape[-1] - 1
        # an utterance too short for its transcript contributes zero, not inf
        return F.ctc_loss(log_probs, flat.to(log_probs.device), torch.tensor(counts), lengths,
                          blank=blank, reduction="sum", zero_infinity=True)


class GlobalMean:
    """A loss summed over positions, divided by the positions of the whole global batch.

    `count` is this rank's number of scored positions over its micro-batches; one all-reduce
    over the data-parallel group gives the global count N. Megatron's schedule divides each
    micro-batch's loss by the number of micro-batches M and DDP averages the gradients over the
    D data-parallel ranks, so a micro-batch's summed loss is scaled by M * D / N: the gradient is
    then that of (sum over all positions) / N. `mean(sums)` is the logged loss, all-reduced the
    same way."""

    def __init__(self, count: torch.Tensor, micro_batches: int):
        self.group = ps.get_data_parallel_group()
        # on this process's device (NCCL), also where the count is a CPU zero (a stage before
        # the last, or a rank whose rollouts were all empty)
        self.count = count.detach().float().reshape(1).to(device(), copy=True)
        dist.all_reduce(self.count, group=self.group)
        self.scale = micro_batches * ps.get_data_parallel_world_size() / self.count.clamp(min=1)

    def __call__(self, summed: torch.Tensor) -> torch.Tensor:
        return summed * self.scale[0].to(summed.device)

    def mean(self, *sums: torch.Tensor) -> list[float]:
        """Global means of per-rank sums, one all-reduce (every rank of the group calls it)."""
        totals = torch.stack([x.detach().float().reshape(()) for x in sums]).to(self.count.device)
        dist.all_reduce(totals, group=self.group)
        return (totals / self.count.clamp(min=1)).tolist()

    @property
    def total(self) -> int:
        return int(self.count.item())


def sft_step(model, batches: list[Batch], ctc: JointCTC | None = None) -> dict:
    """Cross-entropy on the transcript tokens (loss mask) of a step's packed micro-batches, one
    mean over the global batch's tokens; with `ctc`, joint CTC / attention training (one
    pipeline stage): `((1 - w) * CE + w * CTC)`, both summed, per scored token. The
    cross-entropy is computed from the final hidden states at the scored positions only (the
    audio and prompt positions, ~90% of a packed ASR batch, need no output layer), a chunk of
    positions at a time (`linear_cross_entropy`): no [T, V] logits."""
    device = next(model.parameters()).device
    module = getattr(model, "module", model)  # model may be wrapped (DDP)
    micro = []
    for b in batches:
        scored = b.loss_mask[0].nonzero()[:, 0]  # found before the batch moves: no device read
        micro.append({"input_ids": b.input_ids.to(device), "cu_seqlens": b.cu_seqlens.to(device),
                      "audio_features": [f.to(device) for f in b.audio_features],
                      "return_ctc": ctc is not None, "return_hidden": True,
                      "scored": scored.to(device), "labels": b.labels[0][scored].to(device),
                      "texts": b.texts})
    norm = GlobalMean(torch.tensor(sum(len(m["labels"]) for m in micro)), len(micro))

    def loss_fn(output, mb):
        hidden, (log_probs, counts) = output if ctc else (output, (None, None))
        weight = module.output_weight()
        shard = vocab_shard(weight.shape[0])
        labels = mb["labels"]
        ce = linear_cross_entropy(hidden[:, 0].index_select(0, mb["scored"]), weight, labels,
                                  torch.ones(labels.shape, device=labels.device), shard.start,
                                  shard.group)
        loss, report = ce, {"ce": ce.detach()}
        if ctc:
            report["ctc"] = ctc.loss_sum(log_probs, counts, mb["texts"])
            loss = (1 - ctc.weight) * ce + ctc.weight * report["ctc"]
        report["loss"] = loss.detach()
        return norm(loss), report

    reports = run_pipeline(model, micro, loss_fn, forward_only=False)
    if not ps.is_pipeline_last_stage():
        return {}
    keys = ("loss", "ce", "ctc") if ctc else ("loss",)
    means = norm.mean(*(sum(r[k] for r in reports) for k in keys))
    out = {"loss": means[0], "tokens": norm.total}
    if ctc:
        out.update(ce_loss=means[1], ctc_loss=means[2])
    return out


AGREEMENT = ("teacher_mass", "top1_agree", "kl_p50", "kl_p90", "kl_max")
SUMMED = ("fallbacks", "skipped", "time_rollout", "time_teacher")  # over micro-batches; others: mean


def _combine(per_micro: list[dict]) -> dict:
    """One step's rollout metrics from its micro-batches' (sums of counts and times, means of
    rates)."""
    out = {}
    for key in sorted({k for m in per_micro for k in m}):
        values = [m[key] for m in per_micro if key in m]
        out[key] = sum(values) if key in SUMMED else sum(values) / len(values)
    return out


def agreement(student_logits: torch.Tensor, union, student_topk: torch.Tensor,
              tau: float) -> dict:
    """Is distillation working, per step: the teacher's probability mass inside the union
    (how much of its distribution the loss sees), how often the student's top-1 is the
    teacher's (the union lists the teacher's ids first, best first), and quantiles of the
    per-position KL over the positions the loss counts."""
    with torch.no_grad():
        kl, counted = union_kl_rows(student_logits.float(), union.teacher_scores, union.valid, tau)
        mass = union.teacher_scores.float().exp().masked_fill(~union.valid, 0.0).sum(-1)
        teacher_top = union.ids[:, 0]
        agree = ((teacher_top == student_topk[:, 0]) & (teacher_top >= 0)).float()
        # over the counted rows without selecting them (a selection, or a tensor of quantiles
        # made on the host, waits for the GPU between the student's forward and backward);
        # 0 when no row counts
        some = counted.any()
        p50, p90 = (torch.nanquantile(kl.masked_fill(~counted, float("nan")), q)
                    for q in (0.5, 0.9))
        top = kl.masked_fill(~counted, float("-inf")).max()
        return {"teacher_mass": mass.mean(), "top1_agree": agree.mean(),
                "kl_p50": torch.where(some, p50, 0.0), "kl_p90": torch.where(some, p90, 0.0),
                "kl_max": torch.where(some, top, 0.0)}


def _answer_positions(prompt, answer: list[int]) -> list[int]:
    """Positions of prompt + answer whose next-token distribution predicts the answer."""
    start = len(prompt.input_ids) - 1
    return list(range(start, start + len(answer)))


class OPDStep:
    """Rollout -> teacher scoring -> union support -> student forward/backward on the union."""

    def __init__(self, student, teacher: AudioLM, student_prompts: PromptBuilder,
                 teacher_prompts: PromptBuilder, token_map: TokenMap, cfg: OPDSettings,
                 blocked: torch.Tensor | None):
        self.student, self.teacher = student, teacher  # student may be wrapped (DDP)
        self.student_prompts, self.teacher_prompts = student_prompts, teacher_prompts
        self.map, self.cfg, self.blocked = token_map, cfg, blocked

    @property
    def module(self) -> AudioLM:
        return getattr(self.student, "module", self.student)

    def generation(self, step: int, micro: int) -> GenerationConfig:
        """How the rollouts of micro-batch `micro` of training step `step` decode: sampled ones
        draw from a seed of their own (the configured seed, the step, the micro-batch and the
        data-parallel rank; the ranks of one model replica, which must pick the same tokens,
        share it), so that no two rollouts reuse one draw and a resumed run draws as the
        uninterrupted one."""
        config = self.cfg.generation
        if config.greedy:
            return config
        key = [config.seed, step, micro, ps.get_data_parallel_rank()]
        return dataclasses.replace(
            config, seed=int(np.random.SeedSequence(key).generate_state(1)[0]))

    def prepare(self, batch: Batch, generation: GenerationConfig) -> tuple[dict | None, dict]:
        """Rollout (decoded as `generation` says), teacher scoring and union support: the
        student's training input (`micro`: packed ids, cu_seqlens, audio; `flat`: scored
        positions; `union` and the student's top-k ids, on the last stage; the kept utterances
        and their answers) and the metrics so far. `None` when every rollout is empty."""
        cfg, device = self.cfg, next(self.student.parameters()).device
        feats = [f.to(device) for f in batch.audio_features]
        frames = [f.shape[-1] for f in feats]
        prompts = [self.student_prompts.build(n) for n in frames]
        t0 = time.perf_counter()
        stop_id = self.student_prompts.stop_id
        rollout = generate(self.module, [p.input_ids for p in prompts], feats, stop_id,
                           generation, self.blocked)
        t1 = time.perf_counter()

        # answers: the rollout (+ stop when generated), or the reference for empty rollouts
        answers, fallback, empty = [], [], 0
        for i, (tokens, stopped) in enumerate(zip(rollout.tokens, rollout.stopped)):
            if tokens:
                answers.append(tokens + ([stop_id] if stopped else []))
                fallback.append(False)
                continue
            empty += 1
            if cfg.fallback_to_reference:
                answers.append(self.student_prompts.encode(batch.texts[i]) + [stop_id])
                fallback.append(True)
            else:
                answers.append([])
                fallback.append(False)
        keep = [i for i, a in enumerate(answers) if a]
        metrics = {"rollout_nonempty": 1 - empty / len(answers), "fallbacks": sum(fallback),
                   "rollout_len": sum(len(t) for t in rollout.tokens) / len(answers),
                   "time_rollout": t1 - t0}
        if not keep:
            return None, {**metrics, "skipped": 1}
        student_topk = self._student_topk(rollout, answers, fallback, keep, prompts, feats)
        union, mismatch, teacher_inputs = self._teacher_union(answers, keep, frames, feats,
                                                              student_topk)
        metrics.update(time_teacher=time.perf_counter() - t1, mismatch=mismatch)

        seqs = [prompts[i].input_ids + answers[i] for i in keep]
        positions = [_answer_positions(prompts[i], answers[i]) for i in keep]
        ids, cu = packed(seqs, device)
        flat = packed_rows(seqs, positions, device)
        micro = {"input_ids": ids, "cu_seqlens": cu, "audio_features": [feats[i] for i in keep],
                 "return_hidden": True}
        return {"micro": micro, "flat": flat, "union": union, "teacher_inputs": teacher_inputs,
                "keep": keep, "answers": [answers[i] for i in keep],
                "student_topk": student_topk}, metrics

    def __call__(self, batches: list[Batch], step: int = 0) -> dict:
        """Rollouts and teacher scoring for every micro-batch of training step `step`, then the
        student's passes over them (one pipeline schedule); Eq. 1's 1/|T| counts the positions
        of the whole global batch."""
        prepared = [self.prepare(b, self.generation(step, i)) for i, b in enumerate(batches)]
        works = [w for w, _ in prepared if w is not None]
        metrics = _combine([m for _, m in prepared])
        last = ps.is_pipeline_last_stage()
        used = [(w["union"].valid.sum(1) >= 2).sum() if last else torch.zeros(()) for w in works]
        # every rank joins the count's all-reduce and the loss's, also one whose rollouts were
        # all empty (it runs no pass of its own: the gradients' reduction is the trainer's)
        norm = GlobalMean(sum(used, torch.zeros(())), max(len(works), 1))

        def loss_fn(hidden, micro):
            work = micro["work"]
            union, weight = work["union"], self.module.output_weight()
            shard = vocab_shard(weight.shape[0])
            logits = sparse_lm_head(hidden[work["flat"], 0], weight, union.ids,
                                    vocab_start=shard.start, tp_group=shard.group)
            loss = union_kl(logits, union.teacher_scores, union.valid, self.cfg.temperature,
                            reduction="sum", divergence=self.cfg.divergence,
                            beta=self.cfg.jsd_beta)
            return norm(loss), {"loss": loss.detach(), "vuss": union.vuss,
                                **agreement(logits.detach(), union, work["student_topk"],
                                            self.cfg.temperature)}

        reports = []
        if works:
            t0 = time.perf_counter()
            reports = run_pipeline(self.student, [{**w["micro"], "work": w} for w in works],
                                   loss_fn, forward_only=False)
            metrics["time_student"] = time.perf_counter() - t0
        if last:
            loss = norm.mean(sum((r["loss"] for r in reports), torch.zeros(())))[0]
            metrics["positions"] = norm.total
            if norm.total:  # else no rank scored a position: no loss, and the step is skipped
                metrics["loss"] = loss
            if reports:
                metrics.update({k: sum(r[k].item() for r in reports) / len(reports)
                                for k in ("vuss",) + AGREEMENT})
        return metrics

    def _student_topk(self, rollout, answers, fallback, keep, prompts, feats):
        """Student top-k ids [N, k] at every scored position (rows in `keep` order), on the
        last pipeline stage (None elsewhere; every stage takes part in the scoring pass)."""
        rows = {}
        redo = [i for i in keep if fallback[i]]
        top = None
        if redo:  # references the student did not generate: score them by teacher forcing
            top = score(self.module, [prompts[i].input_ids + answers[i] for i in redo],
                        [feats[i] for i in redo],
                        [_answer_positions(prompts[i], answers[i]) for i in redo],
                        self.cfg.top_k, blocked=self.blocked)
        if not ps.is_pipeline_last_stage():
            return None
        if redo:
            offset = 0
            for i in redo:
                rows[i] = top.ids[offset:offset + len(answers[i])]
                offset += len(answers[i])
        for i in keep:
            if i not in rows:
                rows[i] = rollout.topk_ids[i][: len(answers[i])]
        return torch.cat([rows[i] for i in keep])

    def _teacher_union(self, answers, keep, frames, feats, student_topk):
        """Teacher-force the answers; return the union support (last stage), the mismatch rate
        and the teacher's input (sequences, scored positions)."""
        seqs, positions, aligned = [], [], []
        student, teacher = self.student_prompts, self.teacher_prompts
        for i in keep:
            stop = answers[i][-1] == student.stop_id
            words = answers[i][:-1] if stop else answers[i]
            text = student.tokenizer.decode(words)
            prefix = (teacher.build(frames[i]).input_ids
                      + teacher.answer_prefix(infer_language(text)))
            if self.map.identity:
                body = list(words)
                index = list(range(len(words)))
            else:  # re-tokenise by the teacher; align token starts in the UTF-8 bytes
                body = teacher.tokenizer.encode(text, add_special_tokens=False).ids
                index = align_by_characters(byte_spans(student.tokenizer, words),
                                            byte_spans(teacher.tokenizer, body))
            if stop:
                body = body + [teacher.stop_id]
                index = index + [len(body) - 1]
            seqs.append(prefix + body)
            positions.append([len(prefix) - 1 + (j if j >= 0 else 0) for j in index])
            aligned += [j >= 0 for j in index]
        aligned = torch.tensor(aligned, dtype=torch.bool)
        mismatch = 1.0 - aligned.float().mean().item()
        if not ps.is_pipeline_last_stage():
            # the teacher's stages still run their part of the pipeline
            score(self.teacher, seqs, [feats[i] for i in keep], positions, self.cfg.top_k)
            return None, mismatch, (seqs, positions)
        device = student_topk.device
        at_teacher = self.map.to_teacher(student_topk)  # the student's candidates, teacher ids
        top = score(self.teacher, seqs, [feats[i] for i in keep], positions, self.cfg.top_k,
                    ids_to_score=at_teacher)
        aligned = aligned.to(device)
        teacher_ids = self.map.to_student(top.ids).masked_fill(~aligned[:, None], -1)
        # a student candidate the teacher cannot score (no teacher token) leaves the support
        student_ids = student_topk.masked_fill((at_teacher < 0) | ~aligned[:, None], -1)
        union = union_support(teacher_ids, student_ids, top.logprobs,
                              top.logprobs_at_student.nan_to_num(neginf=-1e4))
        return union, mismatch, (seqs, positions)
