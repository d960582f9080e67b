"""Teacher forcing: a model's top-k and log-probabilities at chosen positions of sequences.

Used to score the student's rollouts with the teacher, and to get the student's own top-k on
sequences it did not generate (fallback references). The sequences run packed through the
pipeline (forward only); the results exist on the last pipeline stage.
"""

from __future__ import annotations

import itertools

import torch

from ..distributed import vocab_shard
from ..kernels import TeacherTopK, teacher_topk
from ..models.audio_lm import AudioLM
from ..pipeline import run_pipeline


def packed(sequences: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [len(s) for s in sequences]
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=device)[None]
    return ids, torch.tensor([0] + lengths, device=device).cumsum(0)


@torch.no_grad()
def packed_rows(sequences: list[list[int]], positions: list[list[int]],
                device) -> torch.Tensor:
    """Rows of the packed batch of `sequences` at `positions[i]` of sequence i, from the
    lengths on the host (reading `cu_seqlens` back would wait for the GPU once per row)."""
    starts = itertools.accumulate((len(s) for s in sequences), initial=0)
    return torch.tensor([start + p for start, pos in zip(starts, positions) for p in pos],
                        dtype=torch.long, device=device)


def score(model: AudioLM, sequences: list[list[int]], audio: list[torch.Tensor],
          positions: list[list[int]], k: int, ids_to_score: torch.Tensor | None = None,
          blocked: torch.Tensor | None = None) -> TeacherTopK | None:
    """Top-k ids / log-probs (and log-probs at `ids_to_score` [N, ks]) of the next-token
    distribution at `positions[i]` of `sequences[i]`, rows in order; None off the last stage."""
    device = next(model.parameters()).device
    ids, cu = packed(sequences, device)
    flat = packed_rows(sequences, positions, device)
    if ids_to_score is None:
        ids_to_score = torch.empty(len(flat), 0, dtype=torch.long, device=device)
    result = {}

    def loss_fn(hidden, batch):
        weight = model.output_weight()
        shard = vocab_shard(weight.shape[0])
        # logits are formed a vocabulary chunk at a time, at the chosen positions only
        result["top"] = teacher_topk(k, ids_to_score.to(device), hidden=hidden[flat, 0],
                                     weight=weight, vocab_start=shard.start,
                                     blocked=None if blocked is None else shard.local(blocked),
                                     tp_group=shard.group)
        return hidden.new_zeros(()), {}

    was_training = model.training
    model.eval()
    run_pipeline(model, [{"input_ids": ids, "cu_seqlens": cu, "audio_features": audio,
                          "return_hidden": True}], loss_fn, forward_only=True)
    model.train(was_training)
    return result.get("top")
