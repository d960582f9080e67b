"""Random-weight models at a preset's shapes with a toy tokenizer, for the benchmarks in tools/.

Speed depends on shapes, not on trained weights: a small BPE tokenizer provides the prompt
templates' special tokens, and the model keeps its full vocabulary.
"""

from __future__ import annotations

import torch

TINY_OVERRIDES = {"decoder.vocab_size": 384, "encoder.num_mel_bins": 128}  # --smoke runs


def toy_tokenizer():
    from ark_mega.data import train_bpe_tokenizer

    return train_bpe_tokenizer(["the quick brown fox jumps over the lazy dog", "你好世界"] * 4, 300)


def random_model(name: str, tokenizer, dtype: torch.dtype, device: torch.device,
                 tiny: bool = False, seed: int = 0, **build):
    """(AudioLM with random weights, its PromptBuilder) for preset `name`; `build`: AudioLM's
    keyword arguments (layers, recomputation)."""
    from ark_mega.data import PromptBuilder
    from ark_mega.models import AudioLM, preset

    cfg = preset(name)
    prompts = PromptBuilder.for_model(tokenizer, cfg)
    cfg.audio_token_id = prompts.audio_id
    if tiny:
        cfg.decoder.vocab_size = TINY_OVERRIDES["decoder.vocab_size"]
        cfg.encoder.num_mel_bins = TINY_OVERRIDES["encoder.num_mel_bins"]
    torch.manual_seed(seed)
    return AudioLM(cfg, dtype=dtype, **build).to(device), prompts
