"""Our model shapes <-> Hugging Face config.json, per layout: `glmasr` (transformers' class,
with a Qwen2 text model), `arkasr` (Ark-ASR's own) and `qwen3_asr` (transformers' class; the
original `thinker_config` nesting reads the same). A reader returns (encoder, decoder, audio
token id); `models/families.py` says which family and layout each belongs to."""

from __future__ import annotations

from ..models.config import AudioLMConfig, AuTEncoderConfig, DecoderConfig, WhisperEncoderConfig


class UnsupportedConfig(ValueError):
    """A Hugging Face config that our models cannot express."""


# ----------------------------------------------------------------------------- glmasr


def glmasr_config(cfg: AudioLMConfig):
    """transformers GlmAsrConfig for an Ark-ASR model.

    GLM-ASR's audio tower ends in a LayerNorm and its projector reshapes encoder frames to
    `audio_config.intermediate_size` wide rows before the MLP: both match Ark-ASR's adapter
    (LayerNorm, then merge 4 frames of width h) when intermediate_size == 4 * hidden_size.
    """
    from transformers import GlmAsrConfig, Qwen2Config

    enc, dec = cfg.encoder, cfg.decoder
    if enc.ffn_hidden_size != enc.merge_factor * enc.hidden_size:
        raise ValueError("glmasr merges encoder frames to intermediate_size-wide rows: it needs "
                         f"ffn_hidden_size == merge_factor * hidden_size, got {enc.ffn_hidden_size} "
                         f"!= {enc.merge_factor} * {enc.hidden_size}")
    if enc.merge_factor != 4:
        raise ValueError("glmasr merges exactly 4 encoder frames per audio token")
    audio = dict(num_mel_bins=enc.num_mel_bins, hidden_size=enc.hidden_size,
                 num_hidden_layers=enc.num_layers, num_attention_heads=enc.num_heads,
                 intermediate_size=enc.ffn_hidden_size, max_position_embeddings=enc.max_frames,
                 rope_parameters={"rope_theta": enc.rotary_base, "rope_type": "default",
                                  "partial_rotary_factor": enc.rotary_percent})
    text = Qwen2Config(**_text_kwargs(cfg))
    return GlmAsrConfig(audio_config=audio, text_config=text, audio_token_id=cfg.audio_token_id,
                        tie_word_embeddings=dec.tie_embeddings)


def glmasr_model(cfg: AudioLMConfig):
    """transformers' GlmAsrForConditionalGeneration at our shapes (its own initial weights)."""
    from transformers import GlmAsrForConditionalGeneration

    return GlmAsrForConditionalGeneration(glmasr_config(cfg))


def glmasr_from_hf(hf: dict) -> tuple[WhisperEncoderConfig, DecoderConfig, int]:
    text, audio = hf["text_config"], hf["audio_config"]
    if text.get("model_type") != "qwen2":
        raise UnsupportedConfig(f"glmasr with a {text.get('model_type')!r} text model: only "
                                f"Qwen2 (QKV bias) text models are supported")
    _check_rope(audio, "audio encoder")
    rope = audio.get("rope_parameters") or {}
    enc = WhisperEncoderConfig(
        num_mel_bins=audio["num_mel_bins"], hidden_size=audio["hidden_size"],
        num_layers=audio["num_hidden_layers"], num_heads=audio["num_attention_heads"],
        ffn_hidden_size=audio["intermediate_size"],
        rotary_percent=rope.get("partial_rotary_factor", 0.5),
        rotary_base=rope.get("rope_theta", 10000.0),
        max_frames=audio.get("max_position_embeddings", 1500))
    if enc.ffn_hidden_size != 4 * enc.hidden_size:
        raise UnsupportedConfig("glmasr merges encoder frames to intermediate_size-wide rows; "
                                "our adapter merges 4 frames: intermediate_size must be 4 * hidden_size")
    dec = _decoder(text, False, True, hf.get("tie_word_embeddings", True))
    return enc, dec, hf["audio_token_id"]


# ----------------------------------------------------------------------------- arkasr


def arkasr_config(cfg: AudioLMConfig) -> dict:
    """config.json of Ark-ASR's own layout (loads with its modeling code)."""
    enc, dec = cfg.encoder, cfg.decoder
    if dec.head_dim not in (None, dec.hidden_size // dec.num_heads) or dec.qk_norm:
        raise UnsupportedConfig("arkasr's text model is Qwen2: no head_dim override, no QK-norm")
    return {
        "model_type": "arkasr", "architectures": ["ArkasrForConditionalGeneration"],
        "vocab_size": dec.vocab_size, "hidden_size": dec.hidden_size,
        "num_hidden_layers": dec.num_layers, "num_attention_heads": dec.num_heads,
        "num_key_value_heads": dec.num_kv_heads, "intermediate_size": dec.ffn_hidden_size,
        "hidden_act": "silu", "rms_norm_eps": dec.rms_norm_eps, "rope_theta": dec.rotary_base,
        "max_position_embeddings": dec.max_position_embeddings,
        "tie_word_embeddings": dec.tie_embeddings, "audio_token_id": cfg.audio_token_id,
        "merge_factor": enc.merge_factor, "use_rope": True, "max_whisper_length": enc.max_frames,
        "mlp_adapter_act": "gelu", "adapter_type": "mlp",
        "whisper_config": {"model_type": "whisper", "num_mel_bins": enc.num_mel_bins,
                           "d_model": enc.hidden_size, "encoder_layers": enc.num_layers,
                           "encoder_attention_heads": enc.num_heads,
                           "encoder_ffn_dim": enc.ffn_hidden_size,
                           "max_source_positions": enc.max_frames},
    }


def arkasr_from_hf(hf: dict) -> tuple[WhisperEncoderConfig, DecoderConfig, int]:
    w = hf["whisper_config"]
    if not hf.get("use_rope", True):
        raise UnsupportedConfig("arkasr with use_rope=false (learned positions) is not supported")
    if hf.get("mlp_adapter_act", "gelu") != "gelu" or hf.get("adapter_type", "mlp") != "mlp":
        raise UnsupportedConfig("arkasr adapter: only the gelu MLP adapter is supported")
    enc = WhisperEncoderConfig(
        num_mel_bins=w.get("num_mel_bins", 128), hidden_size=w["d_model"],
        num_layers=w["encoder_layers"], num_heads=w["encoder_attention_heads"],
        ffn_hidden_size=w["encoder_ffn_dim"], max_frames=hf.get("max_whisper_length", 1500),
        merge_factor=hf.get("merge_factor", 4))
    dec = _decoder(hf, False, True, hf.get("tie_word_embeddings", True))
    return enc, dec, hf["audio_token_id"]


# ----------------------------------------------------------------------------- qwen3_asr


def qwen3_asr_config(cfg: AudioLMConfig):
    from transformers import Qwen3ASRConfig

    enc = cfg.encoder
    audio = dict(num_mel_bins=enc.num_mel_bins, encoder_layers=enc.num_layers,
                 encoder_attention_heads=enc.num_heads, encoder_ffn_dim=enc.ffn_hidden_size,
                 d_model=enc.hidden_size, n_window=enc.n_window, output_dim=enc.output_dim,
                 n_window_infer=enc.n_window_infer,
                 downsample_hidden_size=enc.downsample_hidden_size,
                 max_position_embeddings=enc.max_source_positions)
    text = dict(model_type="qwen3", **_text_kwargs(cfg), head_dim=cfg.decoder.kv_channels)
    return Qwen3ASRConfig(audio_config=audio, text_config=text, audio_token_id=cfg.audio_token_id,
                          tie_word_embeddings=cfg.decoder.tie_embeddings)


def qwen3_asr_model(cfg: AudioLMConfig):
    """transformers' Qwen3ASRForConditionalGeneration at our shapes (its own initial weights)."""
    from transformers import Qwen3ASRForConditionalGeneration

    return Qwen3ASRForConditionalGeneration(qwen3_asr_config(cfg))


def qwen3_asr_from_hf(hf: dict) -> tuple[AuTEncoderConfig, DecoderConfig, int]:
    """transformers' `qwen3_asr` config, or the original one nested in `thinker_config`."""
    inner = hf.get("thinker_config", hf)
    text, audio = inner["text_config"], inner["audio_config"]
    enc = AuTEncoderConfig(
        num_mel_bins=audio.get("num_mel_bins", 128), hidden_size=audio["d_model"],
        num_layers=audio["encoder_layers"], num_heads=audio["encoder_attention_heads"],
        ffn_hidden_size=audio["encoder_ffn_dim"],
        downsample_hidden_size=audio.get("downsample_hidden_size", 480),
        output_dim=audio["output_dim"], n_window=audio.get("n_window", 50),
        n_window_infer=audio.get("n_window_infer", 800),
        max_source_positions=audio.get("max_position_embeddings",
                                       audio.get("max_source_positions", 13)))
    dec = _decoder(text, True, False, inner.get("tie_word_embeddings",
                                                hf.get("tie_word_embeddings", True)))
    return enc, dec, inner.get("audio_token_id", hf.get("audio_token_id", 151676))


# ----------------------------------------------------------------------------- text models


def _text_kwargs(cfg: AudioLMConfig) -> dict:
    dec = cfg.decoder
    return dict(vocab_size=dec.vocab_size, hidden_size=dec.hidden_size,
                num_hidden_layers=dec.num_layers, num_attention_heads=dec.num_heads,
                num_key_value_heads=dec.num_kv_heads, intermediate_size=dec.ffn_hidden_size,
                rms_norm_eps=dec.rms_norm_eps, max_position_embeddings=dec.max_position_embeddings,
                tie_word_embeddings=dec.tie_embeddings,
                rope_parameters={"rope_theta": dec.rotary_base, "rope_type": "default"})


def _check_rope(cfg: dict, part: str) -> None:
    """Refuses scaled RoPE, asked for by transformers 5's `rope_parameters` or 4's `rope_scaling`
    (`rope_type`, or the older `type`): our models rotate by plain RoPE only. Qwen3-ASR's
    multimodal fields (`mrope_section`, `interleaved`) with the default type are accepted: it
    gives every token the same position in all three sections, which is plain 1-D RoPE."""
    for key in ("rope_parameters", "rope_scaling"):
        params = cfg.get(key) or {}
        for field in ("rope_type", "type"):
            if params.get(field, "default") != "default":
                raise UnsupportedConfig(f"{part} {key}.{field} = {params[field]!r}: only default "
                                        f"(unscaled) RoPE is supported")


def _rope_theta(text: dict) -> float:
    _check_rope(text, "text model")
    params = text.get("rope_parameters") or {}
    partial = params.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0))
    if partial != 1.0:  # our decoders rotate every dimension of a head
        raise UnsupportedConfig(f"text model partial_rotary_factor = {partial!r}: only full "
                                f"RoPE is supported")
    return float(params.get("rope_theta", text.get("rope_theta", 10000.0)))


def _decoder(text: dict, qk_norm: bool, qkv_bias: bool, tie: bool) -> DecoderConfig:
    if text.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfig(f"text model activation {text['hidden_act']!r}: SwiGLU (silu) only")
    # Qwen2/Qwen3 configs carry a `sliding_window` size that is unused while this is false
    if text.get("use_sliding_window"):
        raise UnsupportedConfig(f"text model use_sliding_window = true (sliding_window "
                                f"{text.get('sliding_window')!r}): only full attention is "
                                f"supported")
    heads = text["num_attention_heads"]
    return DecoderConfig(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
        num_layers=text["num_hidden_layers"], num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") if text.get("head_dim") not in (None, text["hidden_size"] // heads) else None,
        ffn_hidden_size=text["intermediate_size"], rotary_base=_rope_theta(text),
        rms_norm_eps=text.get("rms_norm_eps", 1e-6), qkv_bias=qkv_bias, qk_norm=qk_norm,
        tie_embeddings=tie, max_position_embeddings=text.get("max_position_embeddings", 32768))
