"""Train with ark_mega: the three-stage recipe's stages, or the CPU demo.

    torchrun --nproc_per_node 2 examples/train_opd.py                     # the CPU demo
    torchrun --nproc_per_node 2 examples/train_opd.py --out runs/demo_seed1 seed=1
    torchrun --nproc_per_node 8 examples/train_opd.py --config examples/configs/ark_asr_opd.yaml \
        student.checkpoint=ckpt/ark_base teacher.checkpoint=ckpt/qwen3_asr_1p7b steps=2000

Overrides are `dotted.key=value` (YAML values; for the demo they apply to every stage). A run
config's paths (the config itself, manifests, checkpoints, output_dir) are relative to the
folder the command runs in; the demo runs in the repository whatever the folder. A run resumes
from the newest checkpoint in its output_dir. With a config, the held-out manifest
(data.heldout) is evaluated at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    warnings.filterwarnings("ignore", category=UserWarning)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="run config (YAML); without it, the CPU demo runs")
    ap.add_argument("--out", help="the demo's output folder (default: demo.yaml's, runs/demo); "
                                  "a stage finished there is not trained again")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = ap.parse_args()
    if args.out and args.config:
        ap.error("--out is the demo's; a run config names its own output_dir")
    if args.config is None:
        from ark_mega.demo import run_demo

        if args.out:
            args.out = os.path.abspath(args.out)  # relative to the caller's folder
        os.chdir(ROOT)  # the demo's config names the corpus and models in the repository

        run_demo(os.path.join("examples", "configs", "demo.yaml"), args.overrides, out=args.out)
        return 0
    from ark_mega.config import load_config
    from ark_mega.opd.trainer import PREEMPTED_EXIT_CODE, Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    trainer.run()
    if trainer.preempted:  # saved, and ARK_PREEMPT_MARKER written: slurm/opd.sbatch requeues
        return PREEMPTED_EXIT_CODE
    if cfg.data.heldout:
        rates = trainer.evaluate()
        import torch.distributed as dist

        if dist.get_rank() == 0:
            print("held-out:", ", ".join(f"{k} {v:.4f}" for k, v in rates.items()))
    return 0


if __name__ == "__main__":  # required: dist_checkpointing's save starts a spawned process
    from ark_mega.cli import run

    sys.exit(run(main))
