"""Tiny random-weight transformers models and inputs, shared by the parity tests.

The references are transformers' own `glmasr` (Qwen2 text model) and `qwen3_asr` classes:
nothing here re-implements them.
"""

from __future__ import annotations

import torch

from ark_mega.convert.hf_configs import glmasr_config, qwen3_asr_config
from ark_mega.audio_tokens import aut_audio_tokens, whisper_audio_tokens
from ark_mega.models.config import AudioLMConfig

LAYOUT = {"ark_asr": "glmasr", "qwen3_asr": "qwen3_asr"}


def build_hf_model(cfg: AudioLMConfig, seed: int = 0):
    """A transformers model with every parameter random (norms near 1), float32, eval mode."""
    from transformers import GlmAsrForConditionalGeneration, Qwen3ASRForConditionalGeneration

    torch.manual_seed(seed)
    if cfg.family == "ark_asr":
        model = GlmAsrForConditionalGeneration(glmasr_config(cfg))
    else:
        model = Qwen3ASRForConditionalGeneration(qwen3_asr_config(cfg))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            is_norm_weight = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + noise if is_norm_weight else noise)
    return model.float().eval()


def audio_tokens(cfg: AudioLMConfig, frames: int) -> int:
    if cfg.family == "ark_asr":
        return whisper_audio_tokens(frames, cfg.encoder.merge_factor)
    return aut_audio_tokens(frames, cfg.encoder.n_window)


def make_utterances(cfg: AudioLMConfig, audio_frames: list[int], text_lengths: list[int], seed: int):
    """[(features [mel, frames], token ids [len])]: 3 prompt tokens, audio placeholders, text."""
    gen = torch.Generator().manual_seed(seed)
    vocab = cfg.decoder.vocab_size
    out = []
    for frames, n_text in zip(audio_frames, text_lengths):
        feats = torch.randn(cfg.encoder.num_mel_bins, frames, generator=gen)
        ids = torch.cat([
            torch.randint(0, vocab - 1, (3,), generator=gen),
            torch.full((audio_tokens(cfg, frames),), cfg.audio_token_id),
            torch.randint(0, vocab - 1, (n_text,), generator=gen),
        ])
        out.append((feats, ids))
    return out


def hf_logits(model, cfg: AudioLMConfig, utterances, batched: bool) -> list[torch.Tensor]:
    """Per-utterance logits [len, V] from the transformers model, as one padded batch or one
    utterance at a time."""
    if not batched:
        return [hf_logits(model, cfg, [u], batched=True)[0] for u in utterances]
    n = len(utterances)
    seq = max(ids.numel() for _, ids in utterances)
    input_ids = torch.zeros(n, seq, dtype=torch.long)
    attention = torch.zeros(n, seq, dtype=torch.long)
    for i, (_, ids) in enumerate(utterances):
        input_ids[i, : ids.numel()] = ids
        attention[i, : ids.numel()] = 1
    frames = [f.shape[-1] for f, _ in utterances]
    width = max(frames)
    if cfg.family == "qwen3_asr":
        chunk = 2 * cfg.encoder.n_window
        width = -(-width // chunk) * chunk
    elif len(set(frames)) != 1:
        raise ValueError("glmasr's encoder has no padding mask: a batch needs equal audio lengths")
    feats = torch.zeros(n, cfg.encoder.num_mel_bins, width)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, (f, _) in enumerate(utterances):
        feats[i, :, : f.shape[-1]] = f
        mask[i, : f.shape[-1]] = 1
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention, input_features=feats,
                       input_features_mask=mask).logits
    return [logits[i, : ids.numel()] for i, (_, ids) in enumerate(utterances)]
