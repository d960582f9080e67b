"""Run under torchrun with 2 processes (gloo, CPU): one OPD step at the given TP / PP layout.

    torchrun --nproc_per_node 2 tests/dist_opd.py --tp 2 --pp 1 [--save DIR]

Checks a finite loss, finite non-zero gradients on the student, and an untouched teacher.
With --save: saves the student after the step, and the teacher, (its weights are unchanged: no optimizer step)
and, at PP = 1, its full-vocabulary logits on a fixed input, for tests/test_trainer.py to load
at TP = PP = 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads,
)

from ark_mega import checkpoint  # noqa: E402
from ark_mega.data import PromptBuilder  # noqa: E402
from ark_mega.distributed import ParallelConfig, init_parallel  # noqa: E402
from dist_common import finish  # noqa: E402
from opd_setup import batch, model, opd_step, tokenizer  # noqa: E402


def fixed_logits(student) -> torch.Tensor | None:
    """Full-vocabulary logits on a fixed input (gathered over TP), on the last stage."""
    ids = torch.arange(3, 40)[None] % 250
    with torch.no_grad():
        student.eval()
        out = student(ids, None, torch.tensor([0, ids.shape[1]]))
    parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--save")
    args = ap.parse_args()
    init_parallel(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp))
    sp = PromptBuilder.student(tokenizer())
    student = model("tiny_ark_asr", sp, seed=0, scale=3.0)
    ddp = DistributedDataParallel(config=student.config, ddp_config=DistributedDataParallelConfig(),
                                  module=student)
    step, sp, teacher = opd_step(ddp)
    teacher_before = [p.clone() for p in teacher.parameters()]
    ddp.zero_grad_buffer()
    metrics = step([batch(sp)])
    finalize_model_grads([ddp])
    grads = [p.main_grad for p in student.parameters()]
    ok = all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    ok &= all(p.grad is None and torch.equal(p, q) for p, q in zip(teacher.parameters(), teacher_before))
    last = ps.is_pipeline_last_stage()
    if last:
        ok &= math.isfinite(metrics["loss"]) and metrics["positions"] > 0
    if args.save:
        checkpoint.save(args.save, 1, student)
        checkpoint.save(os.path.join(args.save, "teacher"), 1, teacher)
        if args.pp == 1:  # the fixed input runs on a single stage
            logits = fixed_logits(student) if last else None
            if last and ps.get_tensor_model_parallel_rank() == 0:
                torch.save(logits, os.path.join(args.save, "logits.pt"))
    if last and ps.get_tensor_model_parallel_rank() == 0:
        print(json.dumps({"tp": args.tp, "pp": args.pp, "ok": bool(ok),
                          **{k: v for k, v in metrics.items() if not k.startswith("time")}}),
              flush=True)
    return finish(ok)


if __name__ == "__main__":
    sys.exit(main())
