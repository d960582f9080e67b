"""TD's teacher transcription as a resumable job (ark_mega/opd/teacher_data.py): killed half-way,
it resumes where its shard ends and writes the manifest an uninterrupted run writes."""

import json
import os

import pytest

from ark_mega.data import PromptBuilder, load_manifest
from ark_mega import transcribe as transcribe_module
from ark_mega.opd.teacher_data import read_shard, write_teacher_manifest
from ark_mega.transcribe import blocked_ids
from opd_setup import ROOT, VOCAB, model, tokenizer


class CountingGenerate:
    """The real generator, counting the utterances it decodes; raises on batch `fail_at`."""

    def __init__(self, fail_at=None):
        self.real, self.fail_at, self.batches, self.utterances = transcribe_module.generate, fail_at, 0, 0

    def __call__(self, model, prompts, *args, **kwargs):
        self.batches += 1
        if self.batches == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.utterances += len(prompts)
        return self.real(model, prompts, *args, **kwargs)


def test_killed_td_resumes_to_the_same_manifest(single_rank, tmp_path, monkeypatch):
    tp = PromptBuilder.teacher(tokenizer())
    teacher = model("tiny_qwen3_asr", tp, seed=1, scale=3.0).eval()  # random, but never silent
    cuts, _ = load_manifest(os.path.join(ROOT, "examples", "data", "heldout.jsonl"))
    cuts = list(cuts)[:12]
    args = (blocked_ids(tp, VOCAB), 8, 700, "teacher-checkpoint")  # small batches: several

    whole = write_teacher_manifest(teacher, tp, cuts, len(cuts), str(tmp_path / "whole.jsonl"),
                                   *args)

    out = str(tmp_path / "td.jsonl")
    killed = CountingGenerate(fail_at=3)
    monkeypatch.setattr(transcribe_module, "generate", killed)
    with pytest.raises(KeyboardInterrupt):
        write_teacher_manifest(teacher, tp, cuts, len(cuts), out, *args)
    assert not os.path.exists(out)
    shard = out + ".part-dp0.jsonl"
    done = read_shard(shard)
    assert len(done) == killed.utterances and 0 < len(done) < len(cuts)
    with open(shard, "a", encoding="utf-8") as f:
        f.write('{"id": "' + cuts[-1].id + '", "te')  # the line being written at the kill

    resumed = CountingGenerate()
    monkeypatch.setattr(transcribe_module, "generate", resumed)
    write_teacher_manifest(teacher, tp, cuts, len(cuts), out, *args)
    assert resumed.utterances == len(cuts) - len(done)  # only what the shard did not hold
    with open(whole, encoding="utf-8") as a, open(out, encoding="utf-8") as b:
        assert a.read() == b.read()
    assert not [p for p in os.listdir(tmp_path) if ".part-" in p]  # shards removed
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert rows and all(r["source"]["teacher"] == "teacher-checkpoint" for r in rows)


def test_a_broken_shard_line_is_named(tmp_path):
    shard = tmp_path / "td.jsonl.part-dp0.jsonl"
    shard.write_text('{"id": "a", "text": "x"}\nnot json\n{"id": "b", "text": "y"}\n')
    with pytest.raises(ValueError, match=r"td.jsonl.part-dp0.jsonl: line 2 is not a transcript"):
        read_shard(str(shard))
