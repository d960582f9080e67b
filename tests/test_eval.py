"""Normalisation, corpus CER / WER against hand-computed cases, reports and the CLI tools."""

import json
import os
import socket
import subprocess
import sys

import pytest
import soundfile as sf

from ark_mega.eval import error_rate, normalize, summarize, tables, utterance_rows
from conftest import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_normalisation():
    assert normalize("Hello, World!") == "hello world"
    assert normalize("ＡＢＣ１２３") == "abc123"  # full-width to half-width
    assert normalize("你好，世界。“引号”") == "你好世界引号"  # CJK punctuation
    assert normalize("  a\t b\n") == "a b"
    # removed, not made a space: a word with an apostrophe stays one word (the paper's scoring)
    assert normalize("Don't stop at one O'Clock.") == "dont stop at one oclock"
    r = error_rate(["don't stop at one o'clock"], ["dont stop at one oclock"], "wer")
    assert (r.errors, r.reference_length) == (0, 5)


def test_hand_computed_rates():
    # 你好世界 -> 你好是界啊: one substitution, one insertion over 4 characters
    r = error_rate(["你好世界"], ["你好是界啊"], "cer")
    assert (r.errors, r.reference_length) == (2, 4)
    # spaces do not count in CER, punctuation and case do not count at all
    assert error_rate(["我爱 Python 编程！"], ["我爱python编程"], "cer").errors == 0
    # mixed text: 我爱python编程 (10 units) vs 我爱pyton编程 -> one deletion
    r = error_rate(["我爱 Python 编程"], ["我爱 Pyton 编程"], "cer")
    assert (r.errors, r.reference_length) == (1, 10)
    # WER: hello world -> hello word, one substitution over two words
    r = error_rate(["Hello, World!"], ["hello word"], "wer")
    assert (r.errors, r.reference_length, r.rate) == (1, 2, 0.5)


def test_corpus_rate_sums_edits_rather_than_averaging():
    refs, hyps = ["a b", "c d e f"], ["a", "c d e f"]
    r = error_rate(refs, hyps, "wer")
    assert r.rate == pytest.approx(1 / 6)  # not the mean of 0.5 and 0.0
    with pytest.raises(ValueError, match="metric must be cer or wer"):
        error_rate(refs, hyps, "ser")


def test_report_rows_and_tables():
    rows = utterance_rows(["u1", "u2", "u3"], ["a b c", "d e", "f"], ["a b c", "x", "f g h"], "wer")
    # u2: a substitution and a deletion; u3: two insertions; ties in id order
    assert [(r["id"], r["errors"]) for r in rows] == [("u2", 2), ("u3", 2), ("u1", 0)]
    assert rows[-1] == {"id": "u1", "reference": "a b c", "hypothesis": "a b c",
                        "reference_normalized": "a b c", "hypothesis_normalized": "a b c",
                        "errors": 0, "reference_length": 3}
    text, md = tables([summarize("demo", ["a b"], ["a"], "wer")])
    assert "50.00%" in text and md.splitlines()[2] == "| demo | WER | 50.00% | 1 | 2 | 1 |"


def test_transcribe_and_evaluate_tools(single_rank, tmp_path):
    """A tiny random model imported from a transformers folder transcribes the demo's held-out
    audio; evaluate.py scores the output."""
    from ark_mega.data import train_bpe_tokenizer
    from ark_mega.models import preset
    from hf_reference import build_hf_model

    cfg = preset("tiny_ark_asr")
    cfg.encoder.num_mel_bins = 128
    tok = train_bpe_tokenizer(["hello there", "你好世界"], 250)
    cfg.audio_token_id = tok.token_to_id("<|audio|>")
    build_hf_model(cfg).save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "examples/data/heldout.jsonl"),
                                              encoding="utf-8")][-3:]
    manifest = tmp_path / "m.jsonl"
    with open(manifest, "w", encoding="utf-8") as f:
        for r in rows:
            r["audio"] = os.path.join(ROOT, "examples/data", r["audio"])
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    def run(tool, *args):
        proc = subprocess.run([sys.executable, f"tools/{tool}", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    out = tmp_path / "hyp.jsonl"
    run("transcribe.py", "--model", tmp_path / "hf", "--manifest", manifest, "--out", out,
        "--max-new-tokens", "5")
    hyps = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert len(hyps) == 3 and all(h["rtf"] > 0 and h["reference"] for h in hyps)
    assert all(len(h["text"]) > 0 for h in hyps)
    # two data-parallel ranks split the utterances: the same file, written once
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out2 = tmp_path / "hyp2.jsonl"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "tools/transcribe.py", "--model",
                           str(tmp_path / "hf"), "--manifest", str(manifest), "--out", str(out2),
                           "--max-new-tokens", "5"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    split = [json.loads(line) for line in open(out2, encoding="utf-8")]
    assert [(h["id"], h["text"]) for h in split] == [(h["id"], h["text"]) for h in hyps]
    assert all(h["rtf"] > 0 for h in split)
    stdout = run("evaluate.py", "--hypotheses", out, "--metric", "cer", "--out-dir", tmp_path / "ev")
    assert "hyp" in stdout and (tmp_path / "ev" / "summary.md").is_file()
    scored = [json.loads(line) for line in open(tmp_path / "ev" / "hyp.jsonl", encoding="utf-8")]
    assert [s["errors"] for s in scored] == sorted((s["errors"] for s in scored), reverse=True)
    # with every id blocked but the stop token, the model can only answer nothing
    run("evaluate.py", "--model", tmp_path / "hf", "--manifest", manifest, "--metric", "cer",
        "--out-dir", tmp_path / "blocked", "--max-new-tokens", "5", "--blocked-from", "0")
    empty = [json.loads(line) for line in open(tmp_path / "blocked" / "m.jsonl", encoding="utf-8")]
    assert len(empty) == 3 and all(row["hypothesis"] == "" for row in empty)

    # audio files with a broken one and one over --max-duration: named, or skipped and listed
    good = [r["audio"] for r in rows[:2]]
    (tmp_path / "broken.wav").write_bytes(b"RIFF not audio")
    files = [good[0], tmp_path / "broken.wav", good[1]]
    proc = subprocess.run([sys.executable, "tools/transcribe.py", "--model", tmp_path / "hf",
                           *files, "--out", tmp_path / "f.jsonl"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "broken.wav" in proc.stderr
    stdout = run("transcribe.py", "--model", tmp_path / "hf", *files, "--out", tmp_path / "f.jsonl",
                 "--skip-bad", "--max-duration", "1.5", "--max-new-tokens", "3")
    kept = [json.loads(line)["audio"] for line in open(tmp_path / "f.jsonl", encoding="utf-8")]
    short = [g for g in good if sf.info(g).duration <= 1.5]
    assert kept == short and f"{len(files) - len(short)} skipped" in stdout


def test_evaluate_reads_hypotheses_strictly_and_joins_references_by_id(tmp_path):
    tool = load_tool("evaluate")

    def hyp_file(*rows, raw=None):
        path = tmp_path / "hyp.jsonl"
        path.write_text("\n".join([json.dumps(r) for r in rows] + ([raw] if raw else [])) + "\n")
        return str(path)

    a = {"id": "a", "text": "one two", "reference": "one two"}
    b = {"id": "b", "text": "three", "reference": "four"}
    assert tool._read_hypotheses(hyp_file(a, b)) == (["a", "b"], ["one two", "four"], ["one two", "three"])
    with pytest.raises(ValueError, match=r"hyp.jsonl:2: id 'a' repeats line 1"):
        tool._read_hypotheses(hyp_file(a, a))
    with pytest.raises(ValueError, match=r"hyp.jsonl:2: field 'id' is missing"):
        tool._read_hypotheses(hyp_file(a, {"text": "x", "reference": "y"}))
    with pytest.raises(ValueError, match=r"hyp.jsonl:1: field 'reference' is missing or not a string"):
        tool._read_hypotheses(hyp_file({**a, "reference": None}))
    with pytest.raises(ValueError, match=r"hyp.jsonl:2: not JSON \(.* at column 12\)"):
        tool._read_hypotheses(hyp_file(a, raw='{"id": "c",, "text": "x"}'))
    # references from a manifest, joined by id: the rows' own are not needed
    refs = {"a": "one two", "b": "five"}
    bare = [{"id": r["id"], "text": r["text"]} for r in (a, b)]
    assert tool._read_hypotheses(hyp_file(*bare), refs)[1] == ["one two", "five"]
    with pytest.raises(ValueError, match="no hypothesis for 1 reference"):
        tool._read_hypotheses(hyp_file(bare[0]), refs)
    with pytest.raises(ValueError, match="id 'z' is not in the reference manifest"):
        tool._read_hypotheses(hyp_file({"id": "z", "text": ""}), refs)


@pytest.mark.parametrize("tool,option,value,message", [
    ("transcribe.py", "--max-new-tokens", "0", "must be at least 1, got 0"),
    ("transcribe.py", "--max-duration", "-1", "must be positive, got -1.0"),
    ("evaluate.py", "--batch-tokens", "0", "must be at least 1, got 0"),
])
def test_tool_options_out_of_range_are_named(tool, option, value, message):
    args = {"transcribe.py": ["--model", "m", "--out", "o", "a.wav"],
            "evaluate.py": ["--hypotheses", "h", "--out-dir", "d"]}[tool]
    proc = subprocess.run([sys.executable, f"tools/{tool}", *args, option, value], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and f"argument {option}: {message}" in proc.stderr


def test_held_out_evaluation_scores_every_utterance_or_refuses(tmp_path):
    """Languages as codes, names or left to the text are scored; another language is an error
    naming the manifest, not an utterance silently left out."""
    from types import SimpleNamespace

    from ark_mega.transcribe import _scored_language, evaluate

    def sup(language, text="hello there"):
        return SimpleNamespace(language=language, text=text)

    assert [_scored_language(s) for s in (sup("zh"), sup("Chinese"), sup("English"),
                                          sup(None, "你好世界"), sup(None), sup("fr"))] \
        == ["zh", "zh", "en", "zh", "en", "fr"]
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "examples/data/heldout.jsonl"),
                                              encoding="utf-8")][:3]
    rows[1]["language"] = "fr"
    manifest = tmp_path / "m.jsonl"
    with open(manifest, "w", encoding="utf-8") as f:
        for r in rows:
            r["audio"] = os.path.join(ROOT, "examples/data", r["audio"])
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with pytest.raises(ValueError, match=r"m.jsonl: .* 1 utterances have language \['fr'\]"):
        evaluate(None, None, str(manifest), None)
