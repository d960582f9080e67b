"""One training step of a global batch split over ranks and micro-batches, for
tests/test_global_batch.py (in-process) and tests/dist_global_batch.py (under torchrun).

A split lists, per data-parallel rank, its micro-batches as (first held-out utterance, count).
"""

from __future__ import annotations

import torch
from megatron.core.distributed import (
    DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads,
)

from ark_mega import checkpoint
from ark_mega.data import PromptBuilder
from ark_mega.opd.steps import sft_step
from opd_setup import batch, model, opd_step, stop_at_once, tokenizer

# utterances 0-3 of the held-out split, as one process with one micro-batch would see them
WHOLE = [(0, 4)]
LAYOUTS = {
    # two data-parallel ranks with 1 and 3 utterances: uneven numbers of scored positions
    "dp": {"pp": 1, "split": [[(0, 1)], [(1, 3)]]},
    # two pipeline stages, four micro-batches of different lengths
    "pp": {"pp": 2, "split": [[(0, 1), (1, 1), (2, 1), (3, 1)]]},
    # two data-parallel ranks, the first's student stopping at once (every rollout empty):
    # the step of the second rank's utterance alone, as the first rank reports it
    "dp_one_empty": {"pp": 1, "split": [[(1, 3)], [(0, 1)]], "stops_at_once": [True, False]},
}


def initial_student():
    """The tiny student every run starts from (seed 0, at this process's layout)."""
    sp = PromptBuilder.student(tokenizer())
    return model("tiny_ark_asr", sp, seed=0, scale=3.0), sp


def run_step(stage: str, micro_batches: list[tuple[int, int]], init: str | None = None,
             stops_at_once: bool = False):
    """The tiny student (seed 0, or the weights saved at `init`: initialisation draws differ
    between pipeline layouts) in megatron DDP after one step's backward and
    finalize_model_grads; returns it and the step's metrics. `stops_at_once`: every id but the
    stop token is blocked, so that every OPD rollout is empty."""
    student, sp = initial_student()
    if init:
        checkpoint.load(init, student)
    ddp = DistributedDataParallel(config=student.config, ddp_config=DistributedDataParallelConfig(),
                                  module=student)
    batches = [batch(sp, n, start) for start, n in micro_batches]
    ddp.zero_grad_buffer()
    if stage == "sft":
        metrics = sft_step(ddp, batches)
    else:
        step, _, _ = opd_step(ddp)
        if stops_at_once:
            stop_at_once(step, sp)
        metrics = step(batches)
    finalize_model_grads([ddp])
    return student, metrics


def gradients(student) -> dict[str, torch.Tensor]:
    return {n: p.main_grad.detach().clone() for n, p in student.named_parameters()}


def save_gradients(path: str, student) -> None:
    """The gradients as a checkpoint of weights (each parameter's value := its gradient), which
    loads at any layout."""
    with torch.no_grad():
        for p in student.parameters():
            p.copy_(p.main_grad)
    checkpoint.save(path, 0, student)
