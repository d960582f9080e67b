"""Logit parity of our megatron models with transformers, at the current TP / PP layout.

Used in-process at TP = PP = 1 (test_parity.py) and under torchrun at TP = 2 and PP = 2
(dist_checks.py).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from ark_mega.convert.hf_maps import hf_to_megatron, load_shard
from ark_mega.models import AudioLM
from ark_mega.models.config import AudioLMConfig
from ark_mega.pipeline import logits_report, run_pipeline
from hf_reference import LAYOUT, build_hf_model, hf_logits, make_utterances

# Relative tolerance: max |ours - hf| <= TOL * max |hf| (float32).
TOL = 1e-4

# (audio frames, text tokens) per utterance. glmasr has no encoder padding mask, so its padded
# batch shares one audio length, and it needs (frames + 1) // 2 to be a multiple of 4; its
# packed batch (odd frame counts included) and the AuT teacher vary the length.
CASES = {
    "ark_asr": {"padded": ([64, 64, 64], [5, 11, 2]), "packed": ([64, 47, 79], [5, 11, 2])},
    "qwen3_asr": {"padded": ([137, 250, 420], [5, 11, 2]), "packed": ([137, 250, 420], [9, 1, 4])},
}


def padded_batch(utterances) -> dict:
    seq = max(ids.numel() for _, ids in utterances)
    input_ids = torch.zeros(len(utterances), seq, dtype=torch.long)
    for i, (_, ids) in enumerate(utterances):
        input_ids[i, : ids.numel()] = ids
    return {"input_ids": input_ids, "audio_features": [f for f, _ in utterances]}


def packed_batch(utterances) -> dict:
    lengths = [ids.numel() for _, ids in utterances]
    return {"input_ids": torch.cat([ids for _, ids in utterances])[None],
            "cu_seqlens": torch.tensor([0] + lengths).cumsum(0),
            "audio_features": [f for f, _ in utterances]}


def per_utterance(logits: torch.Tensor, batch: dict) -> list[torch.Tensor]:
    """[s, b, V] logits -> one [len, V] tensor per utterance."""
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"].tolist()
        return [logits[cu[i]:cu[i + 1], 0] for i in range(len(cu) - 1)]
    lengths = [int((row != 0).nonzero().max()) + 1 for row in batch["input_ids"]]
    return [logits[:n, i] for i, n in enumerate(lengths)]


def build_ours(cfg: AudioLMConfig, hf_model) -> AudioLM:
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    shards = hf_to_megatron(hf_model.state_dict(), LAYOUT[cfg.family], cfg, tp, pp)
    model = AudioLM(cfg)
    load_shard(model, shards[(ps.get_tensor_model_parallel_rank(),
                              ps.get_pipeline_model_parallel_rank())])
    return model.eval()


def parity(cfg: AudioLMConfig, seed: int = 0) -> dict[str, float]:
    """{case: max |ours - hf| / max |hf|} on the last stage (empty elsewhere)."""
    hf_model = build_hf_model(cfg, seed)
    model = build_ours(cfg, hf_model)
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    errors = {}
    for layout, (frames, texts) in CASES[cfg.family].items():
        utts = make_utterances(cfg, frames, texts, seed)
        batch = padded_batch(utts) if layout == "padded" else packed_batch(utts)
        with torch.no_grad():
            reports = run_pipeline(model, [batch], logits_report, forward_only=True)
        if not ps.is_pipeline_last_stage():
            continue
        ours = per_utterance(reports[0]["logits"], batch)
        ref = hf_logits(hf_model, cfg, utts, batched=layout == "padded")
        shard = cfg.decoder.vocab_size // tp
        diff = max((o - r[:, tp_rank * shard:(tp_rank + 1) * shard]).abs().max().item()
                   for o, r in zip(ours, ref))
        scale = max(r.abs().max().item() for r in ref)
        errors[layout] = diff / scale
    return errors
