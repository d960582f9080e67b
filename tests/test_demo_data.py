"""The committed demo corpus (examples/data, made by tools/make_demo_data.py) is well formed, and
the generator is deterministic for a seed."""

import json
import os
import re
import shutil

import pytest

sf = pytest.importorskip("soundfile")

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data")
SPLITS = ("train", "heldout", "unlabelled")
FIELDS = {"audio": str, "text": str, "task": str, "begin_time": int, "end_time": int, "language": str}
CJK = re.compile(r"[\u4e00-\u9fff]")


def load(split: str) -> list[dict]:
    path = os.path.join(DATA, f"{split}.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict]]:
    return {split: load(split) for split in SPLITS}


def test_manifest_fields(manifests):
    for split, rows in manifests.items():
        assert rows, split
        for r in rows:
            assert set(r) == set(FIELDS), r
            for key, typ in FIELDS.items():
                assert type(r[key]) is typ, (key, r)
            assert r["task"] == "asr" and r["begin_time"] == -1 and r["end_time"] == -1
            assert r["language"] in ("en", "zh")
            assert r["text"].strip() == r["text"] and r["text"]
            assert not os.path.isabs(r["audio"]) and r["audio"].startswith(f"audio/{split}/")


def test_audio_files(manifests):
    for split, rows in manifests.items():
        paths = [r["audio"] for r in rows]
        assert len(set(paths)) == len(paths), split
        for r in rows:
            path = os.path.join(DATA, r["audio"])  # relative to the manifest's folder
            assert os.path.isfile(path), path
            info = sf.info(path)
            assert info.format == "OGG" and info.subtype == "OPUS", (path, info)
            assert info.samplerate == 16000 and info.channels == 1, path
            assert 0.25 <= info.frames / info.samplerate <= 10.0, (path, info.duration)


def test_splits_and_languages(manifests):
    texts = {split: [r["text"] for r in rows] for split, rows in manifests.items()}
    for split in SPLITS:
        assert len(set(texts[split])) == len(texts[split]), f"repeated sentence in {split}"
        langs = {r["language"] for r in manifests[split]}
        assert langs == {"en", "zh"}, (split, langs)
    assert not set(texts["heldout"]) & set(texts["train"]), "held-out text in train"
    assert not set(texts["heldout"]) & set(texts["unlabelled"]), "held-out text in unlabelled"
    assert len(manifests["train"]) >= 2000 and len(manifests["heldout"]) >= 200
    for rows in manifests.values():  # languages alternate through the manifest
        first_half = [r["language"] for r in rows[: len(rows) // 2]]
        assert 0.4 < first_half.count("zh") / len(first_half) < 0.6
    for rows in manifests.values():
        for r in rows:
            if r["language"] == "zh":
                assert CJK.search(r["text"]) and not re.search(r"[A-Za-z0-9]", r["text"]), r
            else:
                assert r["text"].isascii() and not CJK.search(r["text"]), r


def test_opd_audio_is_train_then_unlabelled(manifests):
    """The demo's OPD stages read train's and unlabelled's audio (examples/configs/demo.yaml)."""
    assert load("opd_audio") == manifests["train"] + manifests["unlabelled"]


def test_folder_size():
    examples = os.path.dirname(DATA)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(examples) for f in fs)
    assert total < 40 * 1024 * 1024, total
    assert os.path.isfile(os.path.join(DATA, "README.md"))


def generate(out, seed, count=12, heldout=4, *extra, splits=("train", "heldout")):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(DATA), os.pardir, "tools", "make_demo_data.py")
    subprocess.run([sys.executable, script, "--seed", str(seed), "--count", str(count),
                    "--heldout", str(heldout), "--out", str(out), *extra], check=True,
                   capture_output=True)
    return {split: [json.loads(line) for line in open(out / f"{split}.jsonl", encoding="utf-8")]
            for split in splits}


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed")
def test_generator_is_deterministic_for_a_seed(tmp_path):
    a, b = generate(tmp_path / "a", 5), generate(tmp_path / "b", 5)
    assert a == b and len(a["train"]) == 8 and len(a["heldout"]) == 4
    for r in a["train"] + a["heldout"]:
        x, _ = sf.read(tmp_path / "a" / r["audio"])
        y, _ = sf.read(tmp_path / "b" / r["audio"])
        assert (x == y).all(), r["audio"]
    other = generate(tmp_path / "c", 6, 12, 12, "--exclude", str(tmp_path / "a" / "train.jsonl"),
                     splits=("heldout",))  # all held out: no train manifest is written
    texts = {r["text"] for r in other["heldout"]}
    assert texts != {r["text"] for r in a["heldout"]}  # a fresh sample
    assert not texts & {r["text"] for r in a["train"]}  # and none of the excluded texts


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed")
def test_generator_writes_a_named_split_at_a_lower_bitrate(tmp_path):
    """`--heldout 0 --split unlabelled` adds that split to a folder and leaves its held-out
    manifest alone; `--opus-level` lowers the bitrate of the same speech."""
    base = generate(tmp_path, 5)
    (extra,) = generate(tmp_path, 8, 8, 0, "--split", "unlabelled", "--opus-level", "0.97",
                        splits=("unlabelled",)).values()
    assert len(extra) == 8 and all(r["audio"].startswith("audio/unlabelled/") for r in extra)
    with open(tmp_path / "heldout.jsonl", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == base["heldout"]
    low = tmp_path / "low"
    generate(low, 5, 12, 4, "--opus-level", "0.97")
    size = sum(os.path.getsize(tmp_path / r["audio"]) for r in base["train"])
    assert sum(os.path.getsize(low / r["audio"]) for r in base["train"]) < 0.8 * size
