"""128-bin log-mel features with Whisper's conventions, for a whole batch on the device.

Per utterance: 25 ms Hann window (n_fft 400), 10 ms hop (160), power spectrum, Slaney mel
filters (0 - 8 kHz), log10 clamped at 1e-10, floored at (its maximum - 8), then (x + 4) / 4.
Frames = samples // 160 (Whisper drops the last centred frame). Each utterance is reflect-padded
on its own before the batch is stacked, so batched features equal per-utterance ones exactly.
"""

from __future__ import annotations

import math

import torch

SAMPLE_RATE, N_FFT, HOP = 16000, 400, 160


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:  # Slaney: linear below 1 kHz, log above
    logstep = math.log(6.4) / 27.0
    return torch.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + torch.log(f / 1000.0) / logstep)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    logstep = math.log(6.4) / 27.0
    return torch.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * torch.exp(logstep * (m - 15.0)))


def mel_filters(n_mels: int = 128, n_fft: int = N_FFT, rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Slaney-normalised triangular mel filters [n_mels, n_fft // 2 + 1] (float64)."""
    freqs = torch.linspace(0, rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = _mel_to_hz(torch.linspace(0.0, float(_hz_to_mel(torch.tensor(rate / 2.0))), n_mels + 2,
                                      dtype=torch.float64))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lower) / (center - lower)
    down = (upper - freqs[None]) / (upper - center)
    weights = torch.clamp(torch.minimum(up, down), min=0.0)
    return weights * (2.0 / (upper - lower))  # equal area per filter


def num_frames(samples: int) -> int:
    return samples // HOP


class LogMel(torch.nn.Module):
    def __init__(self, n_mels: int = 128):
        super().__init__()
        self.register_buffer("filters", mel_filters(n_mels).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    @torch.no_grad()
    def forward(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        """Mono 16 kHz waveforms (1-D) -> log-mel features [n_mels, samples // 160] each."""
        device = self.filters.device
        padded = [torch.nn.functional.pad(w.to(device, torch.float32)[None, None],
                                          (N_FFT // 2, N_FFT // 2), mode="reflect")[0, 0]
                  for w in waves]
        batch = torch.nn.utils.rnn.pad_sequence(padded, batch_first=True)
        spec = torch.stft(batch, N_FFT, HOP, window=self.window, center=False,
                          return_complex=True).abs() ** 2  # [B, F, T]
        logmel = torch.log10(torch.clamp(self.filters @ spec, min=1e-10))
        out = []
        for i, w in enumerate(waves):
            x = logmel[i, :, : num_frames(w.shape[-1])]
            x = torch.maximum(x, x.max() - 8.0)
            out.append((x + 4.0) / 4.0)
        return out
