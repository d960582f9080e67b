"""Check the trainer's stages on this machine's device with the demo's models and data.

SFT, a checkpoint resumed, TD and OPD steps of the demo's models on the demo data.

    python tools/check_trainer.py --out DIR         # GPU: bf16, NCCL (one rank), megatron's
                                                    # distributed optimizer; the CPU: the same
                                                    # settings over gloo

The models are those of the demo's offline training configs, from scratch:
teacher SFT (2 steps, saved) -> student SFT: 2 steps saved, then resumed for a 3rd (model,
optimizer, scheduler, RNG and data position loaded) -> TD (the teacher transcribes a few
utterances; 1 step) -> OPD (3 steps, from a fresh student). Every stage must give finite losses, and OPD non-empty
rollouts. Writes DIR/check_trainer.json: per stage the losses, step times, memory and the
layer implementation, dtype and optimizer that ran. Every run starts from scratch: an earlier
check's runs in DIR are removed first (they would be resumed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("teacher_sft", "student_sft", "td", "opd")  # output folders under DIR


def main() -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the runs and check_trainer.json")
    ap.add_argument("--opd-steps", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=24, help="rollout length in OPD")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.chdir(ROOT)  # the demo manifests name their audio relative to the repository

    import torch
    import torch.distributed as dist

    from ark_mega.config import load_config
    from ark_mega.distributed import ParallelConfig, init_parallel
    from ark_mega.opd.trainer import Trainer

    init_parallel(ParallelConfig())
    for name in RUNS:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)

    def model(name, checkpoint=None):
        """The demo's models as trained offline (examples/configs/demo_teacher.yaml,
        demo_ark_base.yaml), fresh or from `checkpoint`."""
        file = {"teacher": "demo_teacher.yaml", "student": "demo_ark_base.yaml"}[name]
        with open(os.path.join("examples", "configs", file), encoding="utf-8") as f:
            spec = yaml.safe_load(f)["student"]
        return {**spec, "checkpoint": checkpoint} if checkpoint else spec

    def run(name, stage, steps, student, teacher=None, **extra):
        tree = {"stage": stage, "name": name, "output_dir": os.path.join(out, name), "steps": steps,
                "student": student, "dtype": "bf16", "optim": {"lr": 1e-3, "distributed": True},
                "data": {"max_tokens": 2500, "num_workers": 0, "subset": 0.1},
                "save_every": 2, "log_every": 1,
                "opd": {"top_k": 8, "generation": {"max_new_tokens": args.max_new_tokens}}, **extra}
        if teacher:
            tree["teacher"] = teacher
        overrides = [f"{k}={json.dumps(v)}" for k, v in tree.items()]
        t0 = time.perf_counter()
        trainer = Trainer(load_config(None, overrides))
        last = trainer.run()
        record = {"stage": stage, "steps": steps, "seconds": time.perf_counter() - t0,
                  "layers": trainer.student.transformer_impl, "dtype": str(trainer.dtype),
                  "optimizer": type(trainer.optimizer.chained_optimizers[0]).__name__,
                  "backend": dist.get_backend(), **last}
        del trainer
        print(json.dumps({name: record}), flush=True)
        return record

    ckpt = lambda name: os.path.join(out, name, "checkpoints")  # noqa: E731
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    results["teacher_sft"] = run("teacher_sft", "sft", 2, model("teacher"))
    run("student_sft", "sft", 2, model("student"))
    results["student_sft_resumed"] = run("student_sft", "sft", 3, model("student"))
    with open(os.path.join(out, "student_sft", "metrics.jsonl"), encoding="utf-8") as f:
        logged = [json.loads(line)["step"] for line in f]
    results["resume_logged_steps"] = logged
    results["td"] = run("td", "td", 1, model("student", ckpt("student_sft")),
                        model("teacher", ckpt("teacher_sft")),
                        data={"max_tokens": 2500, "num_workers": 0, "train": td_source(out)})
    # OPD from a fresh student: after two SFT steps a student mostly stops at once (empty
    # rollouts, nothing to score), while a random one writes full rollouts
    results["opd"] = run("opd", "opd", args.opd_steps, model("student"),
                         model("teacher", ckpt("teacher_sft")))
    losses = [results[k]["loss"] for k in ("teacher_sft", "student_sft_resumed", "td", "opd")]
    results["passed"] = (all(math.isfinite(x) for x in losses) and logged == [1, 2, 3]
                         and results["opd"]["rollout_nonempty"] > 0)
    with open(os.path.join(out, "check_trainer.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"check_trainer: {'passed' if results['passed'] else 'FAILED'}", flush=True)
    return 0 if results["passed"] else 1


def td_source(out: str) -> str:
    """A short manifest for TD's teacher to transcribe: 8 utterances of both languages."""
    with open(os.path.join(ROOT, "examples", "data", "train.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    path = os.path.join(out, "td_source.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for r in rows[:4] + rows[-4:]:
            r["audio"] = os.path.join(ROOT, "examples", "data", r["audio"])
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


if __name__ == "__main__":  # required: dist_checkpointing's save starts a spawned process
    sys.exit(main())
