"""The CPU demo, shortened to two steps per stage on a few utterances: the shipped models
import, every stage runs, and it writes its table (results.json) and its plot (summary.png)."""

import json
import os

import yaml

from opd_setup import ROOT
from test_trainer import small_manifest


def test_shortened_demo_writes_its_table_and_plot(single_rank, tmp_path):
    from ark_mega.demo import run_demo

    with open(os.path.join(ROOT, "examples", "configs", "demo.yaml"), encoding="utf-8") as f:
        demo = yaml.safe_load(f)
    demo["output_dir"] = str(tmp_path / "demo")
    for stage in demo["stages"].values():
        stage["steps"] = 2
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(demo), encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(ROOT)  # the demo names the corpus relative to the repository
    try:
        table = run_demo(str(config), [f"data.train={small_manifest(tmp_path, 24)}",
                                       f"data.heldout={small_manifest(tmp_path, 6, 'heldout')}"])
    finally:
        os.chdir(cwd)
    assert [r["model"] for r in table] == ["teacher (imported)", "Ark-Base (imported)",
                                          "Ark-Base + OPD", "Ark-Base + TD", "Ark-Base + TD + OPD"]
    assert all({"cer_zh", "wer_en"} <= set(r) for r in table)
    assert table[2]["vuss"] > 1 and table[4]["vuss"] > 1
    # the import is a megatron checkpoint with the folder's tokenizer beside it
    assert (tmp_path / "demo" / "imported" / "teacher" / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "demo" / "results.json").read_text()) == table
    assert (tmp_path / "demo" / "summary.png").read_bytes().startswith(b"\x89PNG")
