"""The CPU demo of the three-stage recipe on the bilingual demo corpus.

teacher SFT (whole train split) -> student SFT on part of it (Ark-Base) -> TD (the teacher
transcribes the train split; the student is fine-tuned on those transcripts) -> OPD, with CER
(Mandarin) / WER (English) on the held-out split after each stage and the VUSS of OPD. Settings
come from examples/configs/demo.yaml; `key=value` overrides apply to every stage.
"""

from __future__ import annotations

import copy
import json
import os
import time

import torch.distributed as dist
import yaml

from .config import load_config
from .data import train_bpe_tokenizer
from .plots import plot_run


def _stage_overrides(spec: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in spec.items():
        if isinstance(value, dict) and key not in ("overrides",):
            out += _stage_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def make_tokenizer(path: str, train: str, vocab: int) -> None:
    """Train the demo's BPE tokenizer on the train transcripts (rank 0), once."""
    if dist.get_rank() == 0 and not os.path.isfile(path):
        with open(train, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        train_bpe_tokenizer(texts, vocab).save(path)
    dist.barrier()


def model_spec(demo: dict, name: str, tokenizer: str, checkpoint: str | None = None) -> dict:
    """The run config of demo.yaml's model `name` ("teacher" / "student"): its preset and
    overrides at the demo's vocabulary size, the tokenizer, and the initial weights if any."""
    spec = copy.deepcopy(demo[name])
    spec["overrides"]["decoder.vocab_size"] = demo["vocab_size"]
    spec["tokenizer"] = tokenizer
    if checkpoint:
        spec["checkpoint"] = checkpoint
    return spec


def run_demo(config_path: str, overrides: list[str]) -> list[dict]:
    from .distributed import ParallelConfig, init_parallel
    from .opd.trainer import Trainer, evaluate

    with open(config_path, encoding="utf-8") as f:
        demo = yaml.safe_load(f)
    out = demo["output_dir"]
    init_parallel(ParallelConfig(**demo["parallel"]))
    tok = os.path.join(out, "tokenizer.json")
    make_tokenizer(tok, "examples/data/train.jsonl", demo["tokenizer_vocab"])

    def model(name, checkpoint=None):
        return model_spec(demo, name, tok, checkpoint)

    def config(stage, name, student, teacher=None, subset=1.0):
        tree = {"stage": stage, "name": name, "output_dir": os.path.join(out, name),
                "student": student, "parallel": demo["parallel"],
                "data": {**demo["data"], "subset": subset}, "save_every": 10**9, "keep_last": 1,
                "opd": {"generation": {"max_new_tokens": demo["max_new_tokens"]}}}
        if teacher:
            tree["teacher"] = teacher
        base = _stage_overrides(tree) + _stage_overrides(demo["stages"][name])
        return load_config(None, base + list(overrides))

    def final(name):
        return os.path.join(out, name, "checkpoints")  # its newest checkpoint

    table, t0 = [], time.time()

    def report(row, trainer_or_model, prompts=None, cfg=None, extra=None):
        if prompts is None:
            rates = trainer_or_model.evaluate()
        else:
            rates = evaluate(trainer_or_model, prompts, cfg.data.heldout, cfg)
        table.append({"model": row, **rates, **(extra or {}), "minutes": (time.time() - t0) / 60})
        if dist.get_rank() == 0:
            print(f"== {row}: " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()), flush=True)

    stages = [
        ("teacher (SFT, all train)", config("sft", "teacher_sft", model("teacher"))),
        ("Ark-Base (student SFT, 30% of train)",
         config("sft", "student_sft", model("student"), subset=demo["student_subset"])),
        ("Ark-Base + TD", config("td", "td", model("student", final("student_sft")),
                                 model("teacher", final("teacher_sft")))),
        ("Ark-Base + TD + OPD", config("opd", "opd", model("student", final("td")),
                                       model("teacher", final("teacher_sft")))),
    ]
    for row, cfg in stages:
        trainer = Trainer(cfg)
        last = trainer.run()
        extra = {"vuss": last.get("vuss")} if cfg.stage == "opd" else None
        report(row, trainer, extra=extra)
        del trainer
    if dist.get_rank() == 0:
        print_table(table)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(table, f, indent=1)
        print(f"plot: {plot_run(out, os.path.join(out, 'summary.png'))}")
    return table


def print_table(table: list[dict]) -> None:
    print("\n| model | CER zh (held-out) | WER en (held-out) | VUSS | minutes |")
    print("|---|---|---|---|---|")
    for r in table:
        vuss = f"{r['vuss']:.2f}" if r.get("vuss") is not None else ""
        print(f"| {r['model']} | {100 * r.get('cer_zh', float('nan')):.1f}% | "
              f"{100 * r.get('wer_en', float('nan')):.1f}% | {vuss} | {r['minutes']:.1f} |")
