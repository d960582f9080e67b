"""Models with their prompt builders, the one way every entry point gets them: built from a
preset and its overrides (`build_model`, training) or loaded trained (`load_model`, from a
megatron checkpoint or a Hugging Face folder). Either way the prompts follow the model's family
and the tokenizer's audio token is checked against the model's."""

from __future__ import annotations

import dataclasses
import os
import typing

import torch

from . import checkpoint
from .config import ModelConfig, RunConfig, coerce
from .data import PromptBuilder, load_tokenizer
from .distributed import device
from .models import AudioLM, AudioLMConfig, preset


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


def run_dtype(cfg: RunConfig) -> torch.dtype:
    """The models' dtype: `auto` is bf16 with CUDA, fp32 on the CPU."""
    auto = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"auto": auto, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype]


def build_model(mcfg: ModelConfig, dtype: torch.dtype,
                ctc_head: bool = False) -> tuple[AudioLM, PromptBuilder]:
    """The preset with its overrides, and the prompt builder of its family (Ark-ASR or
    Qwen3-ASR template); vocabulary and audio token checked against the tokenizer.
    `ctc_head` adds joint CTC training's head (sft.ctc_weight)."""
    if not mcfg.tokenizer:
        raise ValueError(f"model {mcfg.preset}: a tokenizer (tokenizer.json) is required")
    cfg = preset(mcfg.preset)
    for dotted, value in _flattened(mcfg.overrides):
        node = cfg
        *path, last = dotted.split(".")
        for part in path + [last]:
            if not dataclasses.is_dataclass(node) or not hasattr(node, part):
                raise KeyError(f"model override {dotted!r}: no such field in preset {mcfg.preset}")
            parent, node = node, getattr(node, part)
        hint = typing.get_type_hints(type(parent))[last]
        setattr(parent, last, coerce(hint, value, f"model override {dotted}"))
    tokenizer = load_tokenizer(mcfg.tokenizer)
    prompts = PromptBuilder.for_model(tokenizer, cfg)
    cfg.audio_token_id = prompts.audio_id
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > cfg.decoder.vocab_size:
        raise ValueError(f"the tokenizer has {size} tokens, more than the model's vocabulary "
                         f"({cfg.decoder.vocab_size}); set decoder.vocab_size")
    cfg = AudioLMConfig.from_dict(cfg.to_dict())  # re-validated
    try:
        model = AudioLM(cfg, dtype=dtype, transformer_impl=mcfg.transformer_impl, fp8=mcfg.fp8,
                        recompute=mcfg.recompute, recompute_encoder=mcfg.recompute_encoder,
                        ctc_head=ctc_head)
    except ValueError as e:
        raise ValueError(f"model {mcfg.preset}: {e}") from None
    return model.to(device()), prompts


def _flattened(overrides: dict, prefix: str = ""):
    """("decoder.num_layers", 2) pairs; a nested mapping (the command line's
    `student.overrides.decoder.num_layers=2` makes one) names the same fields."""
    for key, value in overrides.items():
        if isinstance(value, dict):
            yield from _flattened(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
