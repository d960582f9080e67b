"""Shapes of the student (Ark-ASR) and teacher (Qwen3-ASR) models, and their presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class WhisperEncoderConfig:
    """Ark-ASR / GLM-ASR audio encoder: Whisper conv front end + bidirectional layers."""

    num_mel_bins: int = 128
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_hidden_size: int = 3072
    rotary_percent: float = 0.5  # RoPE on half of each head's dims
    rotary_base: float = 10000.0
    layernorm_eps: float = 1e-5
    max_frames: int = 1500  # encoder frames after the stride-2 conv (30 s)
    merge_factor: int = 4  # adapter: frames merged into one audio token


@dataclass
class AuTEncoderConfig:
    """Qwen3-ASR AuT audio encoder: chunked Conv2d front end + windowed bidirectional layers."""

    num_mel_bins: int = 128
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_hidden_size: int = 4096
    downsample_hidden_size: int = 480
    output_dim: int = 2048  # = decoder hidden size
    n_window: int = 50  # a conv chunk is 2 * n_window mel frames
    n_window_infer: int = 800  # mel frames per attention window
    max_source_positions: int = 13  # encoder frames per conv chunk
    layernorm_eps: float = 1e-5


@dataclass
class DecoderConfig:
    """Qwen2 / Qwen3 causal decoder."""

    vocab_size: int = 151936
    hidden_size: int = 896
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_heads
    ffn_hidden_size: int = 4864
    rotary_base: float = 1000000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True  # Qwen2: True, Qwen3: False
    qk_norm: bool = False  # Qwen3: True
    tie_embeddings: bool = True
    max_position_embeddings: int = 32768

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass
class AudioLMConfig:
    """An audio encoder + adapter + decoder; `family` (models/families.py) says which encoder."""

    family: str  # "ark_asr" (Whisper encoder), "qwen3_asr" (AuT encoder): models/families.py
    encoder: WhisperEncoderConfig | AuTEncoderConfig
    decoder: DecoderConfig
    audio_token_id: int = 151646

    def __post_init__(self):
        from .families import family  # families imports this module

        fam = family(self.family)
        if not isinstance(self.encoder, fam.encoder_config):
            raise TypeError(f"{self.family} needs a {fam.encoder_config.__name__}")
        if fam.validate is not None:
            fam.validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AudioLMConfig":
        from .families import family  # families imports this module

        enc_cls = family(d["family"]).encoder_config
        return cls(family=d["family"], encoder=enc_cls(**d["encoder"]),
                   decoder=DecoderConfig(**d["decoder"]), audio_token_id=d["audio_token_id"])


# ---------------------------------------------------------------------------------------------
# Presets. Decoder shapes are those of the public Qwen2-0.5B, Qwen3-1.7B and Qwen3-0.6B configs;
# encoder shapes those of the public Qwen3-ASR configs and, for Ark-ASR, a Whisper-small-sized
# encoder with 128 mel bins (the size that, with Qwen2-0.5B, makes the published 0.6B total).
# ---------------------------------------------------------------------------------------------

QWEN3_AUDIO_TOKEN_ID = 151676  # <|audio_pad|>
ARK_AUDIO_TOKEN_ID = 151669  # <|audio|>, first id added on top of the Qwen tokenizer


def ark_asr_0p6b() -> AudioLMConfig:
    return AudioLMConfig(
        family="ark_asr",
        encoder=WhisperEncoderConfig(),
        decoder=DecoderConfig(),
        audio_token_id=ARK_AUDIO_TOKEN_ID,
    )


def qwen3_asr_1p7b() -> AudioLMConfig:
    return AudioLMConfig(
        family="qwen3_asr",
        encoder=AuTEncoderConfig(output_dim=2048),
        decoder=DecoderConfig(
            hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
            ffn_hidden_size=6144, rotary_base=1000000.0, qkv_bias=False, qk_norm=True,
            max_position_embeddings=65536,
        ),
        audio_token_id=QWEN3_AUDIO_TOKEN_ID,
    )


def qwen3_asr_0p6b() -> AudioLMConfig:
    return AudioLMConfig(
        family="qwen3_asr",
        encoder=AuTEncoderConfig(hidden_size=896, num_layers=18, num_heads=14,
                                 ffn_hidden_size=3584, output_dim=1024),
        decoder=DecoderConfig(
            hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
            ffn_hidden_size=3072, rotary_base=1000000.0, qkv_bias=False, qk_norm=True,
            max_position_embeddings=65536,
        ),
        audio_token_id=QWEN3_AUDIO_TOKEN_ID,
    )


def tiny_ark_asr(vocab_size: int = 256, tie_embeddings: bool = True) -> AudioLMConfig:
    return AudioLMConfig(
        family="ark_asr",
        encoder=WhisperEncoderConfig(num_mel_bins=16, hidden_size=32, num_layers=2, num_heads=4,
                                     ffn_hidden_size=128),
        decoder=DecoderConfig(vocab_size=vocab_size, hidden_size=48, num_layers=4, num_heads=4,
                              num_kv_heads=2, ffn_hidden_size=96, rotary_base=10000.0,
                              tie_embeddings=tie_embeddings, max_position_embeddings=1024),
        audio_token_id=vocab_size - 1,
    )


def tiny_qwen3_asr(vocab_size: int = 256) -> AudioLMConfig:
    return AudioLMConfig(
        family="qwen3_asr",
        encoder=AuTEncoderConfig(num_mel_bins=16, hidden_size=32, num_layers=2, num_heads=4,
                                 ffn_hidden_size=64, downsample_hidden_size=8, output_dim=64,
                                 n_window=50, n_window_infer=200, max_source_positions=13),
        decoder=DecoderConfig(vocab_size=vocab_size, hidden_size=64, num_layers=4, num_heads=4,
                              num_kv_heads=2, head_dim=24, ffn_hidden_size=96,
                              rotary_base=5000000.0, qkv_bias=False, qk_norm=True,
                              max_position_embeddings=1024),
        audio_token_id=vocab_size - 1,
    )


PRESETS = {
    "ark_asr_0p6b": ark_asr_0p6b,
    "qwen3_asr_1p7b": qwen3_asr_1p7b,
    "qwen3_asr_0p6b": qwen3_asr_0p6b,
    "tiny_ark_asr": tiny_ark_asr,
    "tiny_qwen3_asr": tiny_qwen3_asr,
}


def preset(name: str) -> AudioLMConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()
