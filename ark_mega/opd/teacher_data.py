"""TD's teacher transcripts as a resumable, data-parallel job.

Each data-parallel replica appends its transcripts to its own shard, `<out>.part-dp<r>.jsonl`
(`{"id", "text"}` per line, flushed after every batch). A restarted job reads every shard
first and transcribes only the utterances none of them holds, whatever its data-parallel size;
a line cut short by a kill is dropped. A `stop()` that turns true (SLURM's USR1 notice) ends
the job after the current batch, its shards kept. When all are done (the shards read at the
start plus what every replica transcribed, which each rank gets back), rank 0 writes the TD
manifest in the order of the source manifest (reference JSONL with provenance: teacher
checkpoint, reference text, source manifest and line; empty transcripts left out and counted),
writes it atomically and removes the shards.
"""

from __future__ import annotations

import glob
import json
import os
import time

import torch
import torch.distributed as dist
from lhotse import CutSet
from megatron.core import parallel_state as ps

from ..data.prompts import PromptBuilder
from ..distributed import any_rank
from ..models.audio_lm import AudioLM
from ..transcribe import transcribe


def _shards(out: str) -> list[str]:
    return sorted(glob.glob(glob.escape(out) + ".part-dp*.jsonl"))


def read_shard(path: str) -> dict[str, str]:
    """{cut id: transcript} of a shard. A last line without its newline was being written when
    the job was killed: it is cut off the file (and transcribed again)."""
    done, good = {}, 0
    with open(path, "rb") as f:
        data = f.read()
    for number, raw in enumerate(data.splitlines(keepends=True), 1):
        if not raw.endswith(b"\n"):
            break
        try:
            record = json.loads(raw)
            done[record["id"]] = record["text"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}: line {number} is not a transcript record "
                             f"({raw[:80]!r})") from None
        good += len(raw)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def write_teacher_manifest(teacher: AudioLM, prompts: PromptBuilder, cuts, total: int, out: str,
                           blocked: torch.Tensor, max_new_tokens: int, batch_tokens: int,
                           teacher_name: str, stop=None) -> str | None:
    """The teacher's transcripts of `cuts` (a re-iterable source of `total` cuts, read lazily: a
    few passes, never held) as the TD manifest `out`, resuming from its shards; None when
    `stop()`, asked after every batch, was true on some rank (the shards hold what is done)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    texts = {}
    for path in _shards(out):
        texts.update(read_shard(path))
    dist.barrier()  # every rank has read the shards before any appends to them
    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage()
    shard = open(f"{out}.part-dp{ps.get_data_parallel_rank()}.jsonl", "a", encoding="utf-8") \
        if writer else None
    progress = _Progress(len(texts), total, writer and ps.get_data_parallel_rank() == 0,
                         ps.get_data_parallel_world_size())

    def on_batch(batch_texts: dict[str, str], seconds: float) -> None:
        if shard:
            shard.writelines(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n"
                             for i, t in batch_texts.items())
            shard.flush()
        progress.add(len(batch_texts))

    def stop_after_batch() -> bool:
        nonlocal stopped  # the ranks of a replica decode each batch together: they stop together
        stopped = any_rank(stop(), ps.get_model_parallel_group())
        return stopped

    stopped = False
    try:
        texts.update(transcribe(teacher, prompts, CutSet(_Untranscribed(cuts, texts)), blocked,
                                max_new_tokens, batch_tokens, on_batch,
                                stop_after_batch if stop is not None else None))
    finally:
        if shard:
            shard.close()
    if any_rank(stopped):  # a replica stopped: its cuts are not all transcribed
        return None
    # every rank holds every transcript: all raise together rather than leave the others waiting
    if not any(texts[c.id].strip() for c in cuts):
        raise RuntimeError(f"TD: the teacher's transcripts of all {total} utterances are "
                           f"empty; is teacher.checkpoint trained?")
    dist.barrier()  # every shard is closed
    if dist.get_rank() == 0:
        _write(cuts, texts, out, teacher_name)
    dist.barrier()
    return out


class _Untranscribed:
    """The cuts of a source that no shard holds a transcript of yet (fixed when it is made)."""

    def __init__(self, cuts, texts: dict[str, str]):
        self.cuts, self.done = cuts, set(texts)

    def __iter__(self):
        return (c for c in self.cuts if c.id not in self.done)


def _write(cuts, texts: dict[str, str], out: str, teacher_name: str) -> None:
    base = os.path.dirname(os.path.abspath(out))
    kept = total = 0
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        for c in cuts:
            total += 1
            text = texts[c.id].strip()
            if not text:
                continue  # an empty teacher transcript is no training target
            kept += 1
            sup = c.supervisions[0]
            f.write(json.dumps({
                "audio": os.path.relpath(c.recording.sources[0].source, base), "text": text,
                "task": "asr", "begin_time": c.start, "end_time": c.start + c.duration,
                "language": sup.language,
                "source": {"teacher": teacher_name, "reference": sup.text,
                           "manifest": sup.custom["manifest"], "line": sup.custom["line"]}},
                ensure_ascii=False) + "\n")
    os.replace(out + ".tmp", out)
    for path in _shards(out):
        os.remove(path)
    print(f"TD: the teacher transcribed {total} utterances, {kept} non-empty "
          f"({total - kept} empty, left out) -> {out}", flush=True)


class _Progress:
    """A progress line about every 30 s (rank 0's replica; the others go at the same pace)."""

    def __init__(self, done: int, total: int, show: bool, replicas: int):
        self.done, self.total, self.show, self.replicas = done, total, show, replicas
        self.t0 = self.last = time.perf_counter()
        self.new = 0
        if show and done:
            print(f"TD: resuming, {done} of {total} utterances already transcribed", flush=True)

    def add(self, n: int) -> None:
        self.new += n * self.replicas  # an estimate: the replicas share the work evenly
        now = time.perf_counter()
        if self.show and (now - self.last > 30 or self.done + self.new >= self.total):
            self.last = now
            rate = self.new / max(now - self.t0, 1e-9)
            print(f"TD: ~{min(self.done + self.new, self.total)}/{self.total} utterances, "
                  f"{rate:.1f} utt/s", flush=True)
