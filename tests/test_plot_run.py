"""tools/plot_run.py turns a recorded metrics.jsonl (and the demo's results.json) into a PNG."""

import json
import os
import shutil
import subprocess
import sys

from opd_setup import ROOT

SCRIPT = os.path.join(ROOT, "tools", "plot_run.py")
METRICS = os.path.join(ROOT, "tests", "data", "metrics_small.jsonl")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True)


def test_a_run_and_a_demo_folder_give_png_files(tmp_path):
    one = tmp_path / "opd"
    one.mkdir()
    shutil.copy(METRICS, one / "metrics.jsonl")
    proc = run(one)
    assert proc.returncode == 0, proc.stderr
    png = (one / "summary.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    (tmp_path / "results.json").write_text(json.dumps([
        {"model": "teacher", "cer_zh": 0.05, "wer_en": 0.07},
        {"model": "Ark-Base + OPD", "cer_zh": 0.2, "wer_en": 0.25, "vuss": 11.0}]))
    proc = run(tmp_path, "--out", tmp_path / "demo.png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "demo.png").read_bytes().startswith(b"\x89PNG")


def test_bad_input_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss":\n')
    proc = run(tmp_path)
    assert proc.returncode != 0 and "metrics.jsonl:2: not JSON" in proc.stderr
    assert run(tmp_path / "missing").returncode == 2
