"""A trained model ready to transcribe: from a megatron checkpoint or a Hugging Face folder."""

from __future__ import annotations

import os

import torch

from . import checkpoint
from .data import PromptBuilder, load_tokenizer
from .distributed import device
from .models import AudioLM


def load_model(path: str, tokenizer: str | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[AudioLM, PromptBuilder]:
    """(model, prompt builder). `path` is a HF folder (config.json + safetensors), a megatron
    checkpoint, or a folder of them (the newest). The tokenizer defaults to the HF folder itself
    or the checkpoint folder's `tokenizer/` (written by tools/convert_checkpoint.py import)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        from .convert.hf_folder import load_hf_model

        model, _ = load_hf_model(path, dtype)
        tokenizer = tokenizer or path
    else:
        resolved = checkpoint.resolve(path)
        model = AudioLM(checkpoint.model_config(resolved), dtype=dtype)
        checkpoint.load(resolved, model)
        if tokenizer is None:
            for candidate in (os.path.join(path, "tokenizer"),
                              os.path.join(os.path.dirname(resolved), "tokenizer")):
                if os.path.isfile(os.path.join(candidate, "tokenizer.json")):
                    tokenizer = candidate
                    break
        if tokenizer is None:
            raise FileNotFoundError(f"{path}: no tokenizer/ beside the checkpoint; pass --tokenizer")
    tok = load_tokenizer(tokenizer)
    cfg = model.cfg
    prompts = PromptBuilder.for_model(tok, cfg)
    if prompts.audio_id != cfg.audio_token_id:
        raise ValueError(f"the tokenizer's {prompts.template.audio_token} is id {prompts.audio_id}, "
                         f"the model's audio token is {cfg.audio_token_id}: wrong tokenizer?")
    return model.to(device()).eval(), prompts
