"""Model families: all that differs between Ark-ASR and Qwen3-ASR models, one entry each.

Everything that depends on a model's family or on a Hugging Face layout asks here: the model's
encoder, its prompts, its config checks, the layouts it converts to and from, the demo's preset.
Generation settings do not differ by family (the stop token and answer prefix come from the
chat template). docs/models.md, "Add a family", says how to add one.

This module imports the modules it gathers from (models.config, data.prompts, convert.hf_maps,
convert.hf_configs); those import it inside the functions that need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..audio_tokens import aut_audio_tokens, whisper_audio_tokens
from ..convert import hf_configs, hf_maps
from ..data.prompts import ARK_ASR, QWEN3_ASR, ChatTemplate
from .audio_encoders import AuTEncoder, WhisperEncoder
from .config import AudioLMConfig, AuTEncoderConfig, WhisperEncoderConfig


@dataclass(frozen=True)
class Layout:
    """A Hugging Face weight layout: tensor names, and the config.json beside them."""

    name: str
    rules: Callable  # AudioLMConfig -> [hf_maps.Rule]: our tensors from its tensors
    config_to_hf: Callable[[AudioLMConfig], dict] | None = None  # its config.json; None: no export
    config_from_hf: Callable | None = None  # config.json -> (encoder, decoder, audio token id)
    model_types: tuple[str, ...] = ()  # the config.json `model_type`s read as this layout
    config_key: str | None = None  # a config.json holding this key is this layout, any model_type
    tensor_prefix: str | None = None  # tensors named so are this layout, whatever the config says
    on_disk: tuple[tuple[str, str], ...] = ()  # (in memory, in the files) name prefixes
    transformers_model: Callable | None = None  # AudioLMConfig -> transformers' own model of it

    def reads(self, hf: dict) -> bool:
        """Whether a config.json is in this layout."""
        if self.config_key is not None and self.config_key in hf:
            return True
        return hf.get("model_type") in self.model_types


@dataclass(frozen=True)
class Family:
    """One model family: `AudioLMConfig.family` names it."""

    name: str
    encoder_config: type  # the encoder's shape, a dataclass (models/config.py)
    encoder: Callable  # (AudioLMConfig, encoder TransformerConfig, use_te) -> the encoder module
    template: ChatTemplate  # the chat prompt around the audio placeholders and the answer
    audio_tokens: Callable[..., int]  # (encoder config, mel frames) -> audio embeddings made
    layouts: tuple[Layout, ...]  # config.json is read in this order; first exportable: default
    tiny_preset: str  # the preset a saved model's config is laid over (demo.checkpoint_spec)
    validate: Callable[[AudioLMConfig], None] | None = None  # the family's own config checks

    @property
    def export_layouts(self) -> tuple[str, ...]:
        return tuple(lay.name for lay in self.layouts if lay.config_to_hf is not None)

    @property
    def transformers_layout(self) -> Layout:
        """The layout that transformers' own model class holds."""
        for lay in self.layouts:
            if lay.transformers_model is not None:
                return lay
        raise ValueError(f"model family {self.name!r} has no layout with a transformers class")


FAMILIES: dict[str, Family] = {}


def register(fam: Family) -> Family:
    """Add a family; its name and its layouts' names must be new."""
    if fam.name in FAMILIES:
        raise ValueError(f"model family {fam.name!r} is already registered")
    taken = sorted({lay.name for lay in fam.layouts} & set(_layouts()))
    if taken:
        raise ValueError(f"Hugging Face layout(s) {taken} already belong to another family")
    FAMILIES[fam.name] = fam
    return fam


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def layout(name: str) -> Layout:
    layouts = _layouts()
    if name not in layouts:
        raise ValueError(f"unknown Hugging Face layout {name!r}; known: {sorted(layouts)}")
    return layouts[name]


def _layouts() -> dict[str, Layout]:
    return {lay.name: lay for fam in FAMILIES.values() for lay in fam.layouts}


def _aut_output_is_decoder_width(cfg: AudioLMConfig) -> None:
    # AuT's projector ends at output_dim and feeds the decoder directly (no adapter)
    if cfg.encoder.output_dim != cfg.decoder.hidden_size:
        raise ValueError(f"the AuT encoder's output_dim ({cfg.encoder.output_dim}) must equal "
                         f"the decoder's hidden_size ({cfg.decoder.hidden_size})")


register(Family(
    name="ark_asr",
    encoder_config=WhisperEncoderConfig,
    encoder=lambda cfg, config, use_te: WhisperEncoder(cfg.encoder, config,
                                                       cfg.decoder.hidden_size, use_te),
    template=ARK_ASR,
    audio_tokens=lambda enc, frames: whisper_audio_tokens(frames, enc.merge_factor),
    layouts=(
        Layout("arkasr", hf_maps.arkasr_rules, hf_configs.arkasr_config,
               hf_configs.arkasr_from_hf, model_types=("arkasr",)),
        # transformers saves `glmasr` under its legacy (llava-style) names, renamed on load
        Layout("glmasr", hf_maps.glmasr_rules, lambda cfg: hf_configs.glmasr_config(cfg).to_dict(),
               hf_configs.glmasr_from_hf, model_types=("glmasr",),
               on_disk=(("model.audio_tower.", "audio_tower."),
                        ("model.multi_modal_projector.", "multi_modal_projector."),
                        ("model.language_model.", "language_model.model."),
                        ("lm_head.", "language_model.lm_head.")),
               transformers_model=hf_configs.glmasr_model),
    ),
    tiny_preset="tiny_ark_asr",
))

register(Family(
    name="qwen3_asr",
    encoder_config=AuTEncoderConfig,
    encoder=lambda cfg, config, use_te: AuTEncoder(cfg.encoder, config, use_te),
    template=QWEN3_ASR,
    audio_tokens=lambda enc, frames: aut_audio_tokens(frames, enc.n_window),
    layouts=(
        # the original qwen-asr package's names: config nested in `thinker_config`, `thinker.*`
        Layout("qwen3_asr_thinker", hf_maps.qwen3_asr_thinker_rules,
               config_from_hf=hf_configs.qwen3_asr_from_hf, config_key="thinker_config",
               tensor_prefix="thinker."),
        Layout("qwen3_asr", hf_maps.qwen3_asr_rules,
               lambda cfg: hf_configs.qwen3_asr_config(cfg).to_dict(),
               hf_configs.qwen3_asr_from_hf, model_types=("qwen3_asr", "qwen3_asr_thinker"),
               transformers_model=hf_configs.qwen3_asr_model),
    ),
    tiny_preset="tiny_qwen3_asr",
    validate=_aut_output_is_decoder_width,
))
