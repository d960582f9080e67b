"""Student and teacher models on megatron-core."""

from .audio_lm import AudioLM
from .config import AudioLMConfig, preset

__all__ = ["AudioLM", "AudioLMConfig", "preset"]
