"""Training data as a stream: lazy passes over a manifest, skips counted once, checks in the
data workers, the skip bound enforced by the trainer."""

import gzip
import json
import os
import re

import numpy as np
import pytest
import soundfile as sf

from ark_mega.config import load_config
from ark_mega.data import (Collator, CutBatches, LoadPolicy, ManifestError, PromptBuilder, SkippedCuts,
                           TokenBudgetSampler, TokenCounter, TokenLimit)
from ark_mega.data.manifests import in_subset
from ark_mega.data.stream import ManifestStream, SkipLedger
from test_data_manifests import tone
from test_data_pipeline import tokenizer  # noqa: F401 (fixture)
from test_trainer import ROOT, run_overrides, small_manifest, tok_file  # noqa: F401 (fixture)


@pytest.fixture
def corpus(tmp_path):
    """A gzipped reference manifest: 6 good records, a missing file at line 3 (found while
    reading) and a silent file at line 5 (found only by decoding)."""
    d = tmp_path / "audio"
    d.mkdir()
    sf.write(d / "silent.flac", np.zeros(16000, np.float32), 16000)
    rows = []
    for i in range(8):
        name = "missing.flac" if i == 2 else "silent.flac" if i == 4 else f"{i}.flac"
        if name == f"{i}.flac":
            sf.write(d / name, tone(0.5 + 0.1 * i), 16000)
        rows.append({"audio": f"audio/{name}", "text": f"utterance {i}", "language": "en"})
    path = tmp_path / "m.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_each_pass_reads_anew_and_counts_a_bad_record_once(corpus):
    met = []
    stream = ManifestStream(corpus, LoadPolicy(skip_bad=True), on_skip=met.append)
    first, second = [c.supervisions[0].custom["line"] for c in stream], list(stream)
    assert first == [1, 2, 4, 5, 6, 7, 8] and len(second) == 7
    assert [e.line for e in met] == [3] and met[0].kind == "audio_missing"
    assert stream.records_read == 8 and stream.finished_pass
    assert [c.supervisions[0].custom["line"] for c in ManifestStream(
        corpus, LoadPolicy(skip_bad=True), 0.5)] == [2, 4, 6, 8]  # line 3 is not in this subset
    with pytest.raises(ManifestError, match=r"m.jsonl.gz:3: field 'audio': file not found"):
        list(ManifestStream(corpus, LoadPolicy()))


def test_workers_drop_undecodable_cuts_and_name_their_line(corpus, tokenizer):  # noqa: F811
    cuts = list(ManifestStream(corpus, LoadPolicy(skip_bad=True)))
    silent = [c for c in cuts if c.supervisions[0].custom["line"] == 5]
    data = CutBatches(Collator(PromptBuilder.student(tokenizer)), LoadPolicy(skip_bad=True))
    batch = data[cuts[:5]]
    assert len(batch.cut_ids) == 4
    assert [(e.line, e.field, e.kind) for e in batch.skipped] == [(5, "audio", "silent_audio")]
    assert isinstance(data[silent], SkippedCuts)
    strict = CutBatches(Collator(PromptBuilder.student(tokenizer)), LoadPolicy())
    with pytest.raises(ManifestError, match=r"m.jsonl.gz:5: field 'audio': segment is silent"):
        strict[silent]


def test_a_cut_longer_than_the_batch_budget_is_a_named_error_or_a_counted_skip(
        corpus, tokenizer):  # noqa: F811
    count = TokenCounter(PromptBuilder.student(tokenizer))
    lengths = {c.supervisions[0].custom["line"]: count(c)
               for c in ManifestStream(corpus, LoadPolicy(skip_bad=True))}
    budget = sorted(lengths.values())[-2]  # the longest cut(s) no longer fit
    too_long = sorted(line for line, n in lengths.items() if n > budget)
    met = []
    stream = ManifestStream(corpus, LoadPolicy(skip_bad=True), on_skip=met.append,
                            admit=TokenLimit(count, budget))
    kept = [c.supervisions[0].custom["line"] for c in stream]
    assert too_long and kept == sorted(set(lengths) - set(too_long))
    assert [(e.line, e.kind) for e in met] == sorted([(3, "audio_missing")] + [
        (line, "over_token_budget") for line in too_long])
    assert len(stream.read_errors) == 1 + len(too_long)
    where = rf"m.jsonl.gz:{too_long[0]}: field 'audio': needs {lengths[too_long[0]]} decoder tokens"
    strict = ManifestStream(corpus, LoadPolicy(), 0.5, admit=TokenLimit(count, budget))
    with pytest.raises(ManifestError, match=where):  # line 3 (missing) is not in this subset
        list(strict)
    sampler = TokenBudgetSampler(ManifestStream(corpus, LoadPolicy(skip_bad=True)).cuts(), budget,
                                 count, shuffle=False)
    with pytest.raises(ManifestError, match=where):  # unchecked, the sampler names it too
        list(sampler)


def test_skip_ledger_judges_the_share_of_records_read(corpus):
    stream = ManifestStream(corpus, LoadPolicy(skip_bad=True))
    ledger = SkipLedger(stream)
    list(stream)
    silent = ManifestError(corpus, 5, "audio", "segment is silent", "silent_audio")
    assert ledger.add([silent]) == [silent] and ledger.add([silent]) == []  # met again: once
    assert ledger.check(0.25) == (2, 8)
    with pytest.raises(ValueError, match=r"skipped 2 of the 8 records read \(25.00%\)"):
        ledger.check(0.2)


def bad_manifest(tmp_path):
    """24 demo utterances with a missing file at line 6 and a silent one at line 10."""
    rows = [json.loads(line) for line in open(small_manifest(tmp_path, 24), encoding="utf-8")]
    sf.write(tmp_path / "silent.flac", np.zeros(16000, np.float32), 16000)
    rows.insert(5, dict(rows[0], audio=str(tmp_path / "missing.ogg")))
    rows.insert(9, dict(rows[0], audio=str(tmp_path / "silent.flac")))
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return manifest


def test_training_skips_bad_records_and_stops_past_the_bound(single_rank, tmp_path, tok_file,
                                                             capfd):  # noqa: F811
    from ark_mega.opd.trainer import Trainer

    manifest = bad_manifest(tmp_path)

    def run(out, bound):
        return Trainer(load_config(None, run_overrides(
            tmp_path, tok_file, tmp_path / out, steps=16, save_every=20, **{
                "data.train": str(manifest), "data.skip_bad": True,
                "data.max_skip_fraction": bound}))).run()

    result = run("ok", 0.1)  # 16 steps cover more than a pass over the 26 records
    assert (result["data_skipped"], result["data_records_read"]) == (2, 26)
    log = capfd.readouterr().out
    assert f"skipped {manifest}:6: field 'audio': file not found" in log
    assert f"skipped {manifest}:10: field 'audio': segment is silent" in log
    with pytest.raises(ValueError, match=r"skipped 1 of the 26 records read \(3.85%\), more than "
                                         r"data.max_skip_fraction=0.01"):
        run("strict", 0.01)  # the missing file is known once the bucket edges are estimated
    assert not os.path.isdir(tmp_path / "strict" / "checkpoints" / "step_000001")


def test_training_skips_a_cut_over_the_batch_budget_when_read(single_rank, tmp_path, tok_file,
                                                              capfd):  # noqa: F811
    from ark_mega.opd.trainer import Trainer

    rows = [json.loads(line) for line in open(small_manifest(tmp_path, 12), encoding="utf-8")]
    rows.insert(3, dict(rows[0], text=" ".join(["word"] * 1500)))  # alone over 1,200 tokens
    manifest = tmp_path / "long.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    result = Trainer(load_config(None, run_overrides(tmp_path, tok_file, tmp_path / "run", steps=2, **{
        "data.train": str(manifest), "data.skip_bad": True, "data.max_skip_fraction": 0.1}))).run()
    assert (result["data_skipped"], result["data_records_read"]) == (1, 13)
    assert re.search(rf"skipped {manifest}:4: field 'audio': needs \d+ decoder tokens \(its "
                     r"audio's, the prompt's and its text's\), more than a whole batch's budget "
                     r"of 1200 \(data.max_tokens\)", capfd.readouterr().out)


def test_td_names_skipped_records_and_stops_past_the_bound_before_transcribing(
        single_rank, tmp_path, tok_file, capfd):  # noqa: F811
    from ark_mega import checkpoint
    from ark_mega.opd.trainer import Trainer
    from opd_setup import VOCAB, model, tokenizer

    manifest = bad_manifest(tmp_path)
    teacher = model("tiny_qwen3_asr", PromptBuilder.teacher(tokenizer()), seed=1)
    checkpoint.save(str(tmp_path / "teacher"), 1, teacher)
    td_manifest = tmp_path / "td.jsonl"
    with pytest.raises(ValueError, match=r"skipped 1 of the 26 records read \(3.85%\), more than "
                                         r"data.max_skip_fraction=0.01"):
        Trainer(load_config(None, run_overrides(tmp_path, tok_file, tmp_path / "td", **{
            "stage": "td", "steps": 1, "td_manifest": str(td_manifest),
            "teacher.preset": "tiny_qwen3_asr", "teacher.checkpoint": str(tmp_path / "teacher"),
            "teacher.overrides": {"decoder.vocab_size": VOCAB, "encoder.num_mel_bins": 128},
            "data.train": str(manifest), "data.skip_bad": True,
            "data.max_skip_fraction": 0.01}))).run()
    assert f"skipped {manifest}:6: field 'audio': file not found" in capfd.readouterr().out
    assert not td_manifest.exists() and not list(tmp_path.glob("td.jsonl.part-*"))


def test_brace_expansion_follows_nemo():
    from ark_mega.data.nemo_tarred import expand_braces

    assert expand_braces("a_{0..2}.tar") == ["a_0.tar", "a_1.tar", "a_2.tar"]
    assert expand_braces("a_{08..10}_{x,y}") == ["a_08_x", "a_08_y", "a_09_x", "a_09_y",
                                                 "a_10_x", "a_10_y"]
    assert expand_braces("a__OP_0..1_CL_.tar") == ["a_0.tar", "a_1.tar"]


def nemo_tarred_set(folder, shards=2, per_shard=4):
    """A NeMo tarred dataset of demo utterances: per shard a tar of audio and a manifest whose
    `audio_filepath` names the members; shard 1's manifest also lists a member its tar lacks."""
    import tarfile

    src = os.path.join(ROOT, "examples", "data")
    rows = [json.loads(line) for line in open(os.path.join(src, "train.jsonl"), encoding="utf-8")]
    for shard in range(shards):
        entries = []
        with tarfile.open(folder / f"audio_{shard}.tar", "w") as tar:
            for r in rows[shard * per_shard:(shard + 1) * per_shard]:
                name = os.path.basename(r["audio"])
                tar.add(os.path.join(src, r["audio"]), arcname=name)
                seconds = sf.info(os.path.join(src, r["audio"])).duration
                entries.append({"audio_filepath": name, "text": r["text"], "duration": seconds,
                                "lang": r["language"], "shard_id": shard})
        if shard == 1:
            entries.insert(2, dict(entries[0], audio_filepath="not_in_the_tar.ogg"))
        (folder / f"manifest_{shard}.json").write_text(
            "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    return str(folder / f"manifest_{{0..{shards - 1}}}.json"), str(folder / f"audio_{{0..{shards - 1}}}.tar")


def test_nemo_tarred_shards_stream_and_train(single_rank, tmp_path, tok_file):  # noqa: F811
    from ark_mega.opd.trainer import Trainer

    manifests, tars = nemo_tarred_set(tmp_path)
    stream = ManifestStream(manifests, LoadPolicy(skip_bad=True), tarred_audio=tars)
    cuts = list(stream)
    assert len(cuts) == 8 and stream.records_read == 9
    assert cuts[0].id == "audio_0.tar:train_00000_en.ogg" and cuts[0].load_audio().shape[0] == 1
    ((where, err),) = stream.read_errors.items()
    assert where == (str(tmp_path / "manifest_1.json"), 3) and err.kind == "audio_missing"
    assert "not_in_the_tar.ogg is not in" in str(err)
    with pytest.raises(ValueError, match="2 manifest\\(s\\) and data.tarred_audio_filepaths 1"):
        list(ManifestStream(manifests, LoadPolicy(), tarred_audio=str(tmp_path / "audio_0.tar")))
    out = tmp_path / "run"
    result = Trainer(load_config(None, run_overrides(tmp_path, tok_file, out, steps=2, **{
        "data.train": manifests, "data.tarred_audio_filepaths": tars, "data.skip_bad": True,
        "data.max_skip_fraction": 0.2}))).run()
    assert result["data_records_read"] == 9 and os.path.isdir(out / "checkpoints" / "step_000002")


def test_a_member_listed_twice_gives_a_cut_per_segment(tmp_path):
    manifests, tars = nemo_tarred_set(tmp_path, shards=1, per_shard=2)
    path = tmp_path / "manifest_0.json"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [dict(rows[0], offset=0.0, duration=0.4), dict(rows[0], offset=0.4, duration=0.3)] + rows[1:]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    cuts = list(ManifestStream(manifests, LoadPolicy(), tarred_audio=tars))
    assert [round(c.duration, 2) for c in cuts[:2]] == [0.4, 0.3] and len(cuts) == 3
    assert len({c.id for c in cuts}) == 3


def test_a_member_that_is_a_link_or_a_folder_is_named_not_lost(tmp_path):
    import io
    import tarfile

    manifests, tars = nemo_tarred_set(tmp_path, shards=1, per_shard=2)
    path = tmp_path / "manifest_0.json"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    with tarfile.open(tmp_path / "audio_0.tar") as tar:
        audio = tar.extractfile(rows[1]["audio_filepath"]).read()
    with tarfile.open(tmp_path / "audio_0.tar", "a") as tar:
        link = tarfile.TarInfo("link.ogg")
        link.type, link.linkname = tarfile.SYMTYPE, rows[0]["audio_filepath"]
        folder = tarfile.TarInfo("folder.ogg")
        folder.type = tarfile.DIRTYPE
        tar.addfile(link)
        tar.addfile(folder)
        # a folder, then a file of the same name: the file is read
        twice = tarfile.TarInfo("twice.ogg")
        twice.type = tarfile.DIRTYPE
        tar.addfile(twice)
        twice = tarfile.TarInfo("twice.ogg")
        twice.size = len(audio)
        tar.addfile(twice, io.BytesIO(audio))
    rows += [dict(rows[0], audio_filepath="link.ogg"), dict(rows[0], audio_filepath="folder.ogg"),
             dict(rows[1], audio_filepath="twice.ogg")]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    stream = ManifestStream(manifests, LoadPolicy(skip_bad=True), tarred_audio=tars)
    cuts = list(stream)
    assert len(cuts) == 3 and stream.records_read == 5
    assert cuts[-1].id.endswith(":twice.ogg") and cuts[-1].load_audio().shape[0] == 1
    errors = {line: err for (_, line), err in stream.read_errors.items()}
    assert sorted(errors) == [3, 4] and {e.kind for e in errors.values()} == {"audio_unreadable"}
    tar, target = tmp_path / "audio_0.tar", rows[0]["audio_filepath"]
    assert f"link.ogg in {tar} is a link to {target}, not a file" in str(errors[3])
    assert "folder.ogg" in str(errors[4]) and "is a folder, not a file" in str(errors[4])
    with pytest.raises(ManifestError, match=r"manifest_0.json:3: field 'audio_filepath': link.ogg"):
        list(ManifestStream(manifests, LoadPolicy(), tarred_audio=tars))


def test_a_tarred_subset_keeps_the_records_of_its_indices(tmp_path):
    """`data.subset` numbers a tarred set's records in tar order, members listed twice and
    members missing from the tar included, as for any manifest."""
    manifests, tars = nemo_tarred_set(tmp_path)
    path = tmp_path / "manifest_0.json"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [dict(rows[0], offset=0.0, duration=0.4), dict(rows[0], offset=0.4, duration=0.3)] + rows[1:]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    full = ManifestStream(manifests, LoadPolicy(skip_bad=True), tarred_audio=tars)
    every = [c.id for c in full] + [f"missing:{line}" for _, line in full.read_errors]
    half = ManifestStream(manifests, LoadPolicy(skip_bad=True), 0.5, tarred_audio=tars)
    kept = [c.id for c in half] + [f"missing:{line}" for _, line in half.read_errors]
    assert len(every) == 10 and kept == [every[i] for i in range(10) if in_subset(i, 0.5)]


def test_a_tarred_subset_takes_its_share_of_bad_manifest_lines(tmp_path):
    """Unreadable manifest lines are records of the subset's numbering too: a subset reports
    its share of them, so the skipped fraction it judges is the manifest's."""
    from ark_mega.data.nemo_tarred import iter_nemo_tarred

    manifests, tars = nemo_tarred_set(tmp_path)
    for shard in (0, 1):
        path = tmp_path / f"manifest_{shard}.json"
        lines = path.read_text().splitlines()
        path.write_text("\n".join(lines[:1] + ['{"audio_filepath": ', '{"text": "x"}'] + lines[1:])
                        + "\n")
    every = [(line, getattr(item, "kind", "cut")) for line, item in
             iter_nemo_tarred(manifests, tars, LoadPolicy())]
    assert [kind for _, kind in every].count("malformed_json") == 2 and len(every) == 13
    half = [(line, getattr(item, "kind", "cut")) for line, item in
            iter_nemo_tarred(manifests, tars, LoadPolicy(), lambda i: in_subset(i, 0.5))]
    assert half == [every[i] for i in range(len(every)) if in_subset(i, 0.5)]
    assert sum(kind != "cut" for _, kind in half) == 2  # of the 5 bad records


def test_nemo_tarred_reader_agrees_with_nemos_own(tmp_path):
    """Where nemo-toolkit is installed: NeMo's lhotse adapter reads the same cuts."""
    adapters = pytest.importorskip("nemo.collections.common.data.lhotse.nemo_adapters")
    manifests, tars = nemo_tarred_set(tmp_path)
    ours = list(ManifestStream(manifests, LoadPolicy(skip_bad=True), tarred_audio=tars))
    from ark_mega.data.nemo_tarred import expand_braces

    theirs = list(adapters.LazyNeMoTarredIterator(expand_braces(manifests), expand_braces(tars)))
    assert [(c.supervisions[0].text, round(c.duration, 3)) for c in ours] == \
        [(c.supervisions[0].text, round(c.duration, 3)) for c in theirs]
