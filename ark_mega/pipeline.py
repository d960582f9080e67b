"""One pass over the pipeline stages through megatron-core's schedules.

With PP = 1 this is a plain forward (and backward); with PP > 1 it is megatron's 1F1B schedule,
which sends activations between stages. `loss_fn(output, batch) -> (loss, report)` runs on the
last stage only; the reports of all micro-batches come back there (empty lists elsewhere).
"""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from .models.audio_lm import AudioLM


def _forward_step(loss_fn):
    def step(data_iterator, model: AudioLM):
        batch = next(data_iterator)
        output = model(batch["input_ids"], batch.get("audio_features"), batch.get("cu_seqlens"),
                       return_hidden=batch.get("return_hidden", False),
                       return_ctc=batch.get("return_ctc", False))
        return output, lambda out: loss_fn(out, batch)

    return step


def run_pipeline(model: AudioLM, micro_batches: list[dict], loss_fn: Callable,
                 forward_only: bool) -> list[dict]:
    """Forward (and backward unless `forward_only`) of `micro_batches` through all stages.

    Each micro-batch is a dict with `input_ids` [b, s] (or packed [1, t] with `cu_seqlens`) and,
    for the first stage, `audio_features`; `return_hidden: True` hands `loss_fn` the final hidden
    states instead of logits, `return_ctc: True` also the CTC head's output (PP = 1: see
    AudioLM.forward). Micro-batches may differ in length: at PP > 1 the stages exchange each
    activation's shape before it (megatron's `variable_seq_lengths`, set by the decoder config).
    """
    batch_size, seq_length = micro_batches[0]["input_ids"].shape
    return get_forward_backward_func()(
        forward_step_func=_forward_step(loss_fn),
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=batch_size,
        forward_only=forward_only,
    )


def logits_report(output: torch.Tensor, batch: dict):
    """A `loss_fn` for forward-only passes that returns the logits themselves."""
    return output.new_zeros(()), {"logits": output.detach()}
