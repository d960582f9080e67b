"""The CPU demo: the paper's rows on the bilingual demo corpus, from shipped models.

A teacher (Qwen3-ASR family) and Ark-Base (Ark-ASR family, trained by SFT on 30% of the train
split) arrive as Hugging Face folders (examples/models/, trained offline: docs/training.md) and
are imported the way downloaded checkpoints are. Then, from Ark-Base: OPD on the train audio,
TD (fine-tuning on the teacher's transcripts of it), and TD followed by OPD. Every row gets CER
(Mandarin) / WER (English) on the held-out split; the OPD rows also their VUSS. Settings come
from examples/configs/demo.yaml; `key=value` overrides apply to every training stage.
"""

from __future__ import annotations

import json
import os
import time

import torch.distributed as dist
import yaml

from . import checkpoint
from .config import load_config
from .plots import plot_run, read_metrics


def _stage_overrides(spec: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in spec.items():
        if isinstance(value, dict) and key not in ("overrides",):
            out += _stage_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def import_hf(folder: str, out: str) -> dict:
    """Import a Hugging Face folder as a megatron checkpoint `out` (every rank takes part; once)
    with its tokenizer in `out/tokenizer`; return the run config of the model it holds."""
    if checkpoint.latest_checkpoint(out) is None:
        from .convert.hf_folder import copy_tokenizer, load_hf_model

        model, _ = load_hf_model(folder)
        checkpoint.save(out, 0, model)
        if dist.get_rank() == 0:
            os.makedirs(os.path.join(out, "tokenizer"), exist_ok=True)
            copy_tokenizer(folder, os.path.join(out, "tokenizer"))
        dist.barrier()
    return checkpoint_spec(out)


def checkpoint_spec(path: str) -> dict:
    """The run config (`student:` / `teacher:`) of the model in a checkpoint folder: its
    family's preset with every field of the saved config as an override, the weights and the
    tokenizer beside them."""
    from .models.families import family

    cfg = checkpoint.model_config(path).to_dict()
    overrides = {f"{part}.{k}": v for part in ("encoder", "decoder") for k, v in cfg[part].items()}
    tokenizer = os.path.join(path, "tokenizer")
    return {"preset": family(cfg["family"]).tiny_preset, "overrides": overrides,
            "checkpoint": path, "tokenizer": tokenizer if os.path.isdir(tokenizer) else None}


def run_demo(config_path: str, overrides: list[str], out: str | None = None) -> list[dict]:
    from .distributed import ParallelConfig, init_parallel
    from .factory import build_model, run_dtype
    from .opd.trainer import Trainer
    from .transcribe import evaluate

    with open(config_path, encoding="utf-8") as f:
        demo = yaml.safe_load(f)
    out = out or demo["output_dir"]
    init_parallel(ParallelConfig(**demo["parallel"]))
    table, t0 = [], time.time()
    teacher = import_hf(demo["teacher"], os.path.join(out, "imported", "teacher"))
    base = import_hf(demo["student"], os.path.join(out, "imported", "ark_base"))

    def config(stage, name, student, teacher_spec=None):
        tree = {"stage": stage, "name": name, "output_dir": os.path.join(out, name),
                "student": student, "parallel": demo["parallel"], "data": dict(demo["data"]),
                "save_every": 10**9, "keep_last": 1,
                "opd": {"generation": {"max_new_tokens": demo["max_new_tokens"]}}}
        if teacher_spec:
            tree["teacher"] = teacher_spec
        base_overrides = _stage_overrides(tree) + _stage_overrides(demo["stages"].get(name, {}))
        return load_config(None, base_overrides + list(overrides))

    def report(row, rates, extra=None):
        table.append({"model": row, **rates, **(extra or {}), "minutes": (time.time() - t0) / 60})
        if dist.get_rank() == 0:
            print(f"== {row}: " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()), flush=True)

    for row, spec in (("teacher (imported)", teacher), ("Ark-Base (imported)", base)):
        cfg = config("sft", "eval", spec)
        model, prompts = build_model(cfg.student, run_dtype(cfg))
        checkpoint.load(spec["checkpoint"], model)
        report(row, evaluate(model.eval(), prompts, cfg.data.heldout, cfg))
        del model

    def final(name):
        return {**base, "checkpoint": os.path.join(out, name, "checkpoints")}  # its newest

    stages = [
        ("Ark-Base + OPD", config("opd", "opd_base", base, teacher)),
        ("Ark-Base + TD", config("td", "td", base, teacher)),
        ("Ark-Base + TD + OPD", config("opd", "opd_td", final("td"), teacher)),
    ]
    for row, cfg in stages:
        trainer = Trainer(cfg)
        trainer.run()
        report(row, trainer.evaluate(), {"vuss": mean_vuss(cfg.output_dir)} if cfg.stage == "opd" else None)
        del trainer
    if dist.get_rank() == 0:
        print_table(table)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(table, f, indent=1)
        print(f"plot: {plot_run(out, os.path.join(out, 'summary.png'))}")
    return table


def mean_vuss(run_dir: str) -> float | None:
    """VUSS averaged over an OPD run's steps (one step's value is noisy)."""
    values = [r["vuss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "vuss" in r]
    return sum(values) / len(values) if values else None


def print_table(table: list[dict]) -> None:
    print("\n| model | CER zh (held-out) | WER en (held-out) | VUSS (mean over OPD) | minutes |")
    print("|---|---|---|---|---|")
    for r in table:
        vuss = f"{r['vuss']:.2f}" if r.get("vuss") is not None else ""
        print(f"| {r['model']} | {100 * r.get('cer_zh', float('nan')):.1f}% | "
              f"{100 * r.get('wer_en', float('nan')):.1f}% | {vuss} | {r['minutes']:.1f} |")
