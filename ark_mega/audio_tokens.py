"""How many audio embeddings each encoder makes of an utterance (no torch or megatron needed:
the data pipeline uses these to place the prompt's audio placeholders)."""

from __future__ import annotations


def whisper_audio_tokens(mel_frames: int, merge_factor: int = 4) -> int:
    """Audio tokens the Whisper encoder + adapter make of `mel_frames` frames."""
    return max(1, ((mel_frames + 1) // 2) // merge_factor)


def aut_audio_tokens(mel_frames: int, n_window: int = 50) -> int:
    """Audio tokens the AuT encoder makes of `mel_frames` frames (13 per full 100-frame chunk)."""
    chunk = 2 * n_window
    full, rest = divmod(mel_frames, chunk)
    tokens_per_chunk = conv_stack_length(chunk)
    return full * tokens_per_chunk + (conv_stack_length(rest) if rest else 0)


def conv_stack_length(frames: int) -> int:
    for _ in range(3):  # three (k=3, s=2, p=1) convolutions
        frames = (frames - 1) // 2 + 1
    return frames
