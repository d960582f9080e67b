"""Our model shapes -> transformers configs (`glmasr` with a Qwen2 text model, `qwen3_asr`)."""

from __future__ import annotations

from ..models.config import AudioLMConfig


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


def _text_kwargs(cfg: AudioLMConfig) -> dict:
    dec = cfg.decoder
    return dict(vocab_size=dec.vocab_size, hidden_size=dec.hidden_size,
                num_hidden_layers=dec.num_layers, num_attention_heads=dec.num_heads,
                num_key_value_heads=dec.num_kv_heads, intermediate_size=dec.ffn_hidden_size,
                rms_norm_eps=dec.rms_norm_eps, max_position_embeddings=dec.max_position_embeddings,
                tie_word_embeddings=dec.tie_embeddings,
                rope_parameters={"rope_theta": dec.rotary_base, "rope_type": "default"})
