"""USR1 (SLURM's notice before the time limit) during TD's teacher transcription: the run stops
after the batch it came in, its shards intact, and exits as after a USR1 save in training (the
launcher's marker; `preempted`, which examples/train_opd.py turns into exit code 3); a rerun
transcribes the rest into the manifest an uninterrupted run writes. Also at DP = 2, where the
replicas stop apart: this file run under torchrun is that check's worker."""

import json
import os
import signal
import sys

import pytest
import torch
import torch.distributed as dist

if not torch.cuda.is_available():  # as conftest.py does, for the torchrun worker
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ark_mega import checkpoint  # noqa: E402
from ark_mega import transcribe as transcribe_module  # noqa: E402
from ark_mega.config import load_config  # noqa: E402
from ark_mega.data import PromptBuilder, load_manifest  # noqa: E402
from ark_mega.opd.teacher_data import read_shard, write_teacher_manifest  # noqa: E402
from ark_mega.transcribe import blocked_ids  # noqa: E402
from conftest import torchrun  # noqa: E402
from opd_setup import ROOT, VOCAB, model, tokenizer  # noqa: E402
from test_teacher_data import CountingGenerate  # noqa: E402
from test_trainer import run_overrides, tok_file  # noqa: E402, F401 (fixture)


class SignalAfter(CountingGenerate):
    """The real generator, counting; this process gets USR1 as batch `at` is decoded."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def __call__(self, *args, **kwargs):
        out = super().__call__(*args, **kwargs)
        if self.batches == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out


def test_usr1_during_transcription_stops_and_a_rerun_completes(single_rank, tmp_path, tok_file,
                                                               monkeypatch, capsys):
    from ark_mega.opd.trainer import Trainer

    tp = PromptBuilder.teacher(tokenizer())
    checkpoint.save(str(tmp_path / "teacher"), 1, model("tiny_qwen3_asr", tp, seed=1, scale=3.0))

    def td(out):  # 12 utterances, several batches
        return Trainer(load_config(None, run_overrides(
            tmp_path, tok_file, tmp_path / out, stage="td", steps=1, eval_batch_tokens=700,
            td_manifest=str(tmp_path / out / "td.jsonl"),
            **{"teacher.preset": "tiny_qwen3_asr", "teacher.checkpoint": str(tmp_path / "teacher"),
               "teacher.overrides": {"decoder.vocab_size": VOCAB, "encoder.num_mel_bins": 128},
               "opd.generation.max_new_tokens": 8, "data.subset": 0.5})))

    td("whole").run()
    marker = tmp_path / "preempted"
    monkeypatch.setenv("ARK_PREEMPT_MARKER", str(marker))
    signalled = SignalAfter(at=2)
    monkeypatch.setattr(transcribe_module, "generate", signalled)
    capsys.readouterr()
    stopped = td("stopped")
    assert stopped.run() == {} and stopped.preempted
    assert "USR1: saved the teacher's transcripts so far and stopping" in capsys.readouterr().out
    assert marker.read_text() == "the teacher's transcripts so far\n"
    assert signalled.batches == 2  # none decoded after the notice's batch
    out = tmp_path / "stopped" / "td.jsonl"
    assert not out.exists()
    assert not checkpoint.list_checkpoints(tmp_path / "stopped" / "checkpoints")  # no step ran
    shard = str(out) + ".part-dp0.jsonl"
    size = os.path.getsize(shard)
    done = read_shard(shard)  # whole lines only (a cut line would be truncated off)
    assert os.path.getsize(shard) == size and len(done) == signalled.utterances < 12

    rerun = CountingGenerate()
    monkeypatch.setattr(transcribe_module, "generate", rerun)
    resumed = td("stopped")
    assert "loss" in resumed.run() and not resumed.preempted
    assert rerun.utterances == 12 - len(done)  # only what the shard did not hold
    assert out.read_bytes() == (tmp_path / "whole" / "td.jsonl").read_bytes()
    assert not list((tmp_path / "stopped").glob("*.part-*"))


def teacher_and_cuts():
    tp = PromptBuilder.teacher(tokenizer())
    teacher = model("tiny_qwen3_asr", tp, seed=1, scale=3.0).eval()
    cuts, _ = load_manifest(os.path.join(ROOT, "examples", "data", "heldout.jsonl"))
    return tp, teacher, list(cuts)[:12], (blocked_ids(tp, VOCAB), 8, 700, "teacher-checkpoint")


def test_replicas_that_stop_apart_keep_their_shards_and_resume(single_rank, tmp_path):
    """DP = 2: both replicas stop after a batch; then only rank 0's, while rank 1 finishes its
    share (and waits for rank 0); then a run to the end."""
    tp, teacher, cuts, args = teacher_and_cuts()
    whole = write_teacher_manifest(teacher, tp, cuts, len(cuts), str(tmp_path / "whole.jsonl"),
                                   *args)
    out = str(tmp_path / "dp2.jsonl")
    (record,) = torchrun("test_td_usr1.py", out)
    r0, r1 = record["ranks"]
    assert r0["returned"] == r1["returned"] == [None, None, out]
    assert r0["batches"][:2] == [1, 1] and r1["batches"][0] == 1  # stopped after their batch
    left = len(cuts) - r0["kept"][0] - r1["kept"][0]
    assert r1["kept"][1] - r1["kept"][0] == left // 2  # rank 1 transcribed all its share
    with open(whole, encoding="utf-8") as a, open(out, encoding="utf-8") as b:
        assert a.read() == b.read()


def replicas_stop_apart(out: str) -> int:
    """The torchrun worker of the DP = 2 check: rank 0 prints each rank's record, one JSON
    line (lines printed by both ranks at once can interleave)."""
    from ark_mega.distributed import ParallelConfig, init_parallel
    from dist_common import finish

    init_parallel(ParallelConfig())
    rank = dist.get_rank()
    tp, teacher, cuts, args = teacher_and_cuts()
    record = {"returned": [], "batches": [], "kept": []}
    for stopping in ({0, 1}, {0}, set()):
        batches = [0]

        def stop():
            batches[0] += 1
            return rank in stopping

        record["returned"].append(write_teacher_manifest(teacher, tp, cuts, len(cuts), out, *args,
                                                         stop=stop))
        record["batches"].append(batches[0])
        shard = f"{out}.part-dp{rank}.jsonl"
        record["kept"].append(len(read_shard(shard)) if os.path.exists(shard) else None)
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if rank == 0:
        print(json.dumps({"ranks": records}), flush=True)
    return finish(True)


if __name__ == "__main__":
    sys.exit(replicas_stop_apart(sys.argv[1]))
