"""Run under torchrun (gloo, CPU): logit parity with transformers and a few training steps of the
tiny student at the TP / PP layout given on the command line.

    torchrun --nproc_per_node 2 tests/dist_checks.py --tp 2 --pp 1

Prints one JSON line per check from the last pipeline stage's TP rank 0 and exits non-zero on
any failure; tests/test_parallel.py runs it.
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

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads,
)

from ark_mega.distributed import ParallelConfig, init_parallel  # noqa: E402
from dist_common import finish  # noqa: E402
from ark_mega.models import AudioLM, preset  # noqa: E402
from ark_mega.pipeline import run_pipeline  # noqa: E402
from hf_reference import make_utterances  # noqa: E402
from parity import TOL, packed_batch, parity  # noqa: E402


def report(record: dict) -> None:
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        print(json.dumps(record), flush=True)


def next_token_loss(cfg):
    def loss_fn(logits, batch):
        ids = batch["input_ids"][0]
        labels = torch.roll(ids, -1)
        cu = batch["cu_seqlens"]
        valid = (labels != cfg.audio_token_id)
        valid[cu[1:] - 1] = False  # the last token of each utterance predicts nothing
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits[:, 0].float(), labels)
        loss = (losses * valid).sum() / valid.sum()
        return loss, {"loss": loss.detach()}

    return loss_fn


def train_steps(steps: int = 6, lr: float = 3e-3) -> list[float]:
    """Forward + backward + AdamW steps of the tiny student on one packed batch."""
    cfg = preset("tiny_ark_asr")
    torch.manual_seed(0)
    model = AudioLM(cfg)
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(),
                                  module=model)
    params = [p for p in ddp.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    batch = packed_batch(make_utterances(cfg, [64, 47, 79], [12, 9, 15], seed=3))
    losses = []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        reports = run_pipeline(ddp, [batch], next_token_loss(cfg), forward_only=False)
        # Tied embedding / output weights of the first and last stage get one summed gradient.
        finalize_model_grads([ddp])
        for p in params:
            p.grad = p.main_grad
            if not torch.isfinite(p.grad).all():
                raise RuntimeError("non-finite gradient")
        opt.step()
        loss = reports[0]["loss"].item() if reports else float("nan")
        losses.append(loss)
    return losses, tied_copies_equal(model)


def tied_copies_equal(model: AudioLM) -> bool:
    """At PP > 1 the first stage's embedding and the last stage's output weight are copies of
    one tied weight: they must still be equal after training."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return True
    weight = model.shared_embedding_or_output_weight().detach()
    group = ps.get_embedding_group()
    copies = [torch.empty_like(weight) for _ in range(dist.get_world_size(group))]
    dist.all_gather(copies, weight, group=group)
    return all(torch.equal(copies[0], c) for c in copies[1:])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    args = ap.parse_args()
    init_parallel(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp))
    ok = True
    for name in ("tiny_ark_asr", "tiny_qwen3_asr"):
        errors = parity(preset(name))
        passed = all(e <= TOL for e in errors.values())
        if ps.is_pipeline_last_stage():
            ok &= passed
        report({"check": "parity", "model": name, "tp": args.tp, "pp": args.pp,
                "errors": errors, "passed": passed})
    losses, tied_equal = train_steps()
    ok &= tied_equal
    if ps.is_pipeline_last_stage():
        decreasing = all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
        ok &= decreasing
        report({"check": "train", "tp": args.tp, "pp": args.pp, "losses": losses,
                "tied_copies_equal": tied_equal, "passed": decreasing and tied_equal})
    return finish(ok)


if __name__ == "__main__":
    sys.exit(main())
