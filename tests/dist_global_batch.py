"""Run under torchrun with 2 processes (gloo, CPU): one SFT and/or OPD step of the global
batch `global_batch.LAYOUTS[layout]` describes, at that layout, whose gradients
test_global_batch.py compares with one process holding the same utterances.

    torchrun --nproc_per_node 2 tests/dist_global_batch.py --layout dp --stages sft,opd \
        --init INIT --out DIR

Each stage's gradients (after megatron's finalize_model_grads) are written into the weights
and saved as a checkpoint (DIR/<stage>), so that the test loads them into a one-process model
whatever the layout; the last stage prints each step's metrics as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron.core import parallel_state as ps  # noqa: E402

from ark_mega.distributed import ParallelConfig, init_parallel  # noqa: E402
from dist_common import finish  # noqa: E402
from global_batch import LAYOUTS, run_step, save_gradients  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", choices=sorted(LAYOUTS), required=True)
    ap.add_argument("--stages", required=True, help="sft, opd or sft,opd")
    ap.add_argument("--init", required=True, help="the student's initial weights (a checkpoint)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    layout = LAYOUTS[args.layout]
    init_parallel(ParallelConfig(pipeline_parallel=layout["pp"]))
    rank = ps.get_data_parallel_rank()
    for stage in args.stages.split(","):
        stops = layout.get("stops_at_once", [False] * len(layout["split"]))[rank]
        student, metrics = run_step(stage, layout["split"][rank], args.init, stops)
        save_gradients(os.path.join(args.out, stage), student)
        if ps.is_pipeline_last_stage() and rank == 0:
            print(json.dumps({"stage": stage, **{k: v for k, v in metrics.items()
                                                 if not k.startswith("time")}}), flush=True)
    return finish(True)


if __name__ == "__main__":
    sys.exit(main())
