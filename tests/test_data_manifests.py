"""Manifests -> lhotse cuts: every format, and a precise error (or a counted skip) for bad input."""

import json

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet

from ark_mega.data.manifests import LoadPolicy, ManifestError, load_manifest, manifest_format


def tone(seconds, rate=16000, channels=1, amp=0.3):
    t = np.arange(int(seconds * rate)) / rate
    x = (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return np.stack([x] * channels, 1) if channels > 1 else x


@pytest.fixture
def audio(tmp_path):
    d = tmp_path / "audio"
    d.mkdir()
    sf.write(d / "a.flac", tone(2.0), 16000)
    sf.write(d / "stereo_22k.wav", tone(1.5, rate=22050, channels=2), 22050)
    sf.write(d / "silent.flac", np.zeros(16000, np.float32), 16000)
    sf.write(d / "long.flac", tone(31.0, amp=0.1), 16000)
    (d / "corrupt.flac").write_bytes(b"fLaC" + b"\x00" * 200)
    return d


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
            f.write("\n")
    return str(path)


def ref(audio, text="hello there", **kw):
    return {"audio": f"audio/{audio}", "text": text, "task": "asr", "begin_time": -1,
            "end_time": -1, **kw}


def test_reference_jsonl(tmp_path, audio):
    m = write_jsonl(tmp_path / "m.jsonl", [
        ref("a.flac", language="en"),
        ref("stereo_22k.wav", text="你好世界", begin_time=0.25, end_time=1.25),
    ])
    assert manifest_format(m) == "reference"
    cuts, report = load_manifest(m)
    a, b = list(cuts)
    assert report.total == 2 and not report.skipped
    assert a.duration == pytest.approx(2.0) and a.supervisions[0].language == "en"
    assert b.duration == pytest.approx(1.0) and b.sampling_rate == 16000 and b.num_channels == 1
    wave = b.load_audio()
    assert wave.shape == (1, 16000)
    assert b.supervisions[0].text == "你好世界"
    assert b.supervisions[0].custom == {"manifest": m, "line": 2, "field": "audio"}


def test_nemo_manifest_reads_durations_from_the_file(tmp_path, audio):
    m = write_jsonl(tmp_path / "nemo.jsonl", [
        {"audio_filepath": str(audio / "a.flac"), "duration": 99.0, "text": "whole file"},
        {"audio_filepath": "audio/a.flac", "offset": 0.5, "duration": 1.0, "text": "segment"},
    ])
    assert manifest_format(m) == "nemo"
    whole, seg = list(load_manifest(m)[0])
    assert whole.duration == pytest.approx(2.0)  # the stated 99 s is not trusted
    assert seg.duration == pytest.approx(1.0) and seg.start == pytest.approx(0.5)
    klingon = write_jsonl(tmp_path / "k.jsonl", [
        {"audio_filepath": "audio/a.flac", "text": "x", "lang": "fr"},
        {"audio_filepath": "audio/a.flac", "text": "x", "lang": "klingon"}])
    with pytest.raises(ManifestError, match=r"k.jsonl:2: field 'lang': unknown language 'klingon'"):
        load_manifest(klingon)


def test_lhotse_cutset_manifest(tmp_path, audio):
    cuts, _ = load_manifest(write_jsonl(tmp_path / "m.jsonl", [ref("a.flac")]))
    path = str(tmp_path / "cuts.jsonl.gz")
    cuts.to_file(path)
    again, _ = load_manifest(path)
    assert [c.supervisions[0].text for c in again] == ["hello there"]
    shar = tmp_path / "shar"
    shar.mkdir()
    CutSet.from_cuts(list(cuts)).to_shar(str(shar), fields={"recording": "flac"}, shard_size=10)
    from_shar, _ = load_manifest(str(shar))
    assert len(list(from_shar)) == 1


def test_lhotse_manifest_records_are_named_by_their_line(tmp_path, audio):
    """A lhotse manifest's bad record names its line (blank lines counted), like the other
    formats; a repeated cut id is an error: ids key token counts and teacher transcripts."""
    cuts, _ = load_manifest(write_jsonl(tmp_path / "m.jsonl", [ref("a.flac"), ref("a.flac")]))
    path = tmp_path / "cuts.jsonl"
    cuts.to_file(str(path))
    one, two = path.read_text().splitlines()
    not_a_cut = json.dumps({"type": "MonoCut", "id": "x", "start": 0})
    first, second = list(cuts)
    mixed = json.dumps(first.mix(second).to_dict())
    untyped = {k: v for k, v in json.loads(two).items() if k != "type"} | {"id": "untyped"}
    m = write_jsonl(tmp_path / "bad.jsonl", [one, "", '{"type": "MonoCut", "id": ', two,
                                             not_a_cut, one, mixed, untyped])
    assert manifest_format(m) == "lhotse"
    kept, report = load_manifest(m, LoadPolicy(skip_bad=True, max_skip_fraction=0.9))
    assert [c.supervisions[0].custom["line"] for c in kept] == [1, 4, 8]
    assert [(e.line, e.field, e.kind) for e in report.errors] == [
        (3, "<json>", "malformed_json"), (5, "<cut>", "bad_field"), (6, "id", "duplicate_id"),
        (7, "type", "bad_field")]
    assert "repeats the id of line 1" in str(report.errors[2])
    with pytest.raises(ManifestError, match=r"bad.jsonl:3: field '<json>': malformed JSON"):
        load_manifest(m)


BAD = [
    ("malformed_json", '{"audio": "audio/a.flac", "text": ', "<json>"),
    ("missing_field", {"audio": "audio/a.flac"}, "text"),
    ("missing_field", {"text": "x"}, "audio"),
    ("audio_missing", ref("nope.flac"), "audio"),
    ("audio_unreadable", ref("corrupt.flac"), "audio"),
    ("silent_audio", ref("silent.flac"), "audio"),
    ("too_long", ref("long.flac"), "audio"),
    ("segment_outside_file", ref("a.flac", begin_time=0.5, end_time=3.0), "end_time"),
    ("segment_outside_file", ref("a.flac", begin_time=2.5, end_time=3.0), "begin_time"),
    ("empty_audio", ref("a.flac", begin_time=1.0, end_time=1.0), "end_time"),
    # 10 ms: the features' reflect padding needs more than half their 25 ms window
    ("too_short", ref("a.flac", begin_time=1.0, end_time=1.01), "audio"),
    ("empty_text", ref("a.flac", text="   "), "text"),
    ("bad_field", ref("a.flac", task="translate"), "task"),
    ("bad_field", ref("a.flac", begin_time="soon"), "begin_time"),
    ("bad_field", ref("a.flac", language="xx"), "language"),  # a language the prompts lack
]


@pytest.mark.parametrize("kind,row,field", BAD, ids=[f"{k}-{f}" for k, _, f in BAD])
def test_bad_records_name_manifest_line_and_field(tmp_path, audio, kind, row, field):
    m = write_jsonl(tmp_path / "m.jsonl", [ref("a.flac"), row])
    with pytest.raises(ManifestError) as e:
        load_manifest(m)
    assert (e.value.manifest, e.value.line, e.value.field, e.value.kind) == (m, 2, field, kind)
    assert str(e.value).startswith(f"{m}:2: field '{field}':")


@pytest.mark.parametrize("line,column", [('{"audio": "audio/a.flac", "text": ', 35),
                                         ('{"audio": "audio/a.flac" "text": "x"}', 26)])
def test_malformed_json_names_its_column(tmp_path, audio, line, column):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps(ref("a.flac")) + "\n" + line + "\n")
    with pytest.raises(ManifestError, match=rf"m.jsonl:2: field '<json>': malformed JSON: .* at column {column}$"):
        load_manifest(str(m))


def test_non_utf8_text_is_named(tmp_path, audio):
    m = tmp_path / "m.jsonl"
    m.write_bytes(json.dumps(ref("a.flac")).encode() + b"\n"
                  + b'{"audio": "audio/a.flac", "text": "caf\xe9"}\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:2: field 'text': not valid UTF-8"):
        load_manifest(str(m))


def test_skip_bad_counts_each_kind_and_enforces_the_bound(tmp_path, audio):
    rows = [ref("a.flac")] * 8 + [row for _, row, _ in BAD[:4]]
    m = write_jsonl(tmp_path / "m.jsonl", rows)
    cuts, report = load_manifest(m, LoadPolicy(skip_bad=True, max_skip_fraction=0.5))
    assert len(list(cuts)) == 8 and report.total == 12
    assert report.skipped == {"malformed_json": 1, "missing_field": 2, "audio_missing": 1}
    assert "8 of 12 records kept, 4 skipped" in report.summary()
    with pytest.raises(ValueError, match="more than max_skip_fraction=0.1"):
        load_manifest(m, LoadPolicy(skip_bad=True, max_skip_fraction=0.1))


def test_subsets_spread_over_the_whole_manifest():
    from ark_mega.data import in_subset

    records = ["en"] * 150 + ["zh"] * 150  # a manifest sorted by language, as the demo's was
    chosen = [r for i, r in enumerate(records) if in_subset(i, 0.3)]
    assert len(chosen) == 90 and chosen.count("zh") == 45
    assert [i for i in range(10) if in_subset(i, 0.3)] == [3, 6, 9]  # deterministic, in order
    assert all(in_subset(i, 1.0) for i in range(5))
    with pytest.raises(ValueError, match="subset must be in"):
        in_subset(0, 0.0)