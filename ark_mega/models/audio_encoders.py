"""Audio encoders: log-mel features of each utterance -> audio embeddings for the decoder.

Both take a list of per-utterance features `[num_mel_bins, frames]` (no padding) and return
the audio embeddings of all utterances concatenated `[sum(tokens), decoder_hidden]` with the
token count of each. The transformer layers run packed: every utterance (Whisper) or attention
window (AuT) is one cu_seqlens segment, so no frame attends across a boundary or to padding.
The conv front ends are small and replicated on every tensor-parallel rank; the transformer
layers and the adapter / projector MLPs are tensor-parallel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from ..audio_tokens import aut_audio_tokens, conv_stack_length
from .attention import PackedSegments, rope_in_core_attention, rope_inputs
from .config import AuTEncoderConfig, WhisperEncoderConfig
from .specs import encoder_layer_spec


def packed_seq_params(cu_seqlens: torch.Tensor) -> PackedSegments:
    """megatron's THD description of segments with boundaries `cu_seqlens` [n + 1]."""
    cu = cu_seqlens.to(torch.int32)
    bounds = tuple(cu.tolist())  # the one device-to-host read of the boundaries
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    return PackedSegments(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=longest, max_seqlen_kv=longest, boundaries=bounds)


def _packed(lengths: list[int], device) -> PackedSegments:
    return packed_seq_params(torch.tensor([0] + lengths, device=device).cumsum(0))


class MLPProjector(MegatronModule):
    """Linear -> GELU -> Linear, column- then row-parallel (one all-reduce)."""

    def __init__(self, config: TransformerConfig, in_size: int, mid_size: int, out_size: int):
        super().__init__(config=config)
        self.fc1 = ColumnParallelLinear(in_size, mid_size, config=config,
                                        init_method=config.init_method, bias=True,
                                        gather_output=False)
        self.fc2 = RowParallelLinear(mid_size, out_size, config=config,
                                     init_method=config.output_layer_init_method, bias=True,
                                     input_is_parallel=True, skip_bias_add=False)

    def forward(self, x):
        h, _ = self.fc1(x)
        out, _ = self.fc2(F.gelu(h))
        return out


class WhisperEncoder(MegatronModule):
    """Ark-ASR audio encoder + adapter.

    conv(k3) -> GELU -> conv(k3, s2) -> GELU -> pre-LN bidirectional layers with RoPE on half
    of each head -> LayerNorm (the adapter's; the encoder's own final norm is identity) ->
    merge `merge_factor` frames -> Linear(4h, 2d) -> GELU -> Linear(2d, d).
    """

    def __init__(self, cfg: WhisperEncoderConfig, config: TransformerConfig, decoder_hidden: int,
                 use_te: bool = False):
        super().__init__(config=config)
        self.cfg = cfg
        h = cfg.hidden_size
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, h, kernel_size=3, padding=1, dtype=config.params_dtype)
        self.conv2 = nn.Conv1d(h, h, kernel_size=3, stride=2, padding=1, dtype=config.params_dtype)
        self.rotary = RotaryEmbedding(kv_channels=config.kv_channels,
                                      rotary_percent=cfg.rotary_percent,
                                      rotary_base=cfg.rotary_base,
                                      use_cpu_initialization=config.use_cpu_initialization)
        # post_process=True gives the block a final LayerNorm: that is the adapter's LayerNorm.
        self.block = TransformerBlock(config=config, spec=encoder_layer_spec(False, use_te),
                                      pre_process=True, post_process=True)
        self.rope_in_core_attention = rope_in_core_attention(self.block)  # local even with TE
        merged = h * cfg.merge_factor
        self.adapter = MLPProjector(config, merged, 2 * decoder_hidden, decoder_hidden)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        device = self.conv1.weight.device
        frames_in = [f.shape[-1] for f in features]
        x = torch.zeros(len(features), self.cfg.num_mel_bins, max(frames_in), device=device,
                        dtype=self.conv1.weight.dtype)
        for i, f in enumerate(features):
            x[i, :, : f.shape[-1]] = f
        # Zero everything past each utterance, so that the convolutions see exactly the zero
        # padding they would see on that utterance alone.
        valid = torch.arange(x.shape[-1], device=device)[None, None, :] < torch.tensor(
            frames_in, device=device)[:, None, None]
        x = F.gelu(self.conv1(x)) * valid
        x = F.gelu(self.conv2(x))
        lengths = [(t + 1) // 2 for t in frames_in]
        if max(lengths) > self.cfg.max_frames:
            raise ValueError(f"audio of {max(frames_in)} mel frames gives {max(lengths)} encoder "
                             f"frames; the encoder takes at most {self.cfg.max_frames} (30 s)")
        frames = torch.cat([x[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])
        packed, rotary = rope_inputs(_packed(lengths, device), self.rotary(max(lengths)),
                                     self.config.params_dtype, self.rope_in_core_attention)
        hidden = self.block(frames.unsqueeze(1), attention_mask=None, rotary_pos_emb=rotary,
                            packed_seq_params=packed)[:, 0]
        merged, counts, start = [], [], 0
        m = self.cfg.merge_factor
        for n in lengths:
            h = hidden[start:start + n]
            start += n
            if n < m:  # shorter than one merge group: pad it up to one token
                h = torch.cat([h, h.new_zeros(m - n, h.shape[-1])])
            tokens = h.shape[0] // m
            merged.append(h[: tokens * m].reshape(tokens, m * h.shape[-1]))
            counts.append(tokens)
        out = self.adapter(torch.cat(merged).unsqueeze(1))[:, 0]
        return out, counts


class SinusoidalPositions(nn.Module):
    """Whisper-style sinusoidal positions: [sin(t * w_i) | cos(t * w_i)]."""

    def __init__(self, length: int, channels: int, max_timescale: float = 10000.0):
        super().__init__()
        log_inc = math.log(max_timescale) / (channels // 2 - 1)
        inv = torch.exp(-log_inc * torch.arange(channels // 2).float())
        t = torch.arange(length)[:, None].float() * inv[None, :]
        self.register_buffer("table", torch.cat([t.sin(), t.cos()], dim=1), persistent=False)

    def forward(self, length: int) -> torch.Tensor:
        return self.table[:length]


class AuTEncoder(MegatronModule):
    """Qwen3-ASR AuT audio encoder + projector.

    Each utterance is cut into chunks of 2 * n_window mel frames (the last zero-padded); each
    chunk goes through 3x Conv2d(s2) -> Linear, gets sinusoidal positions restarting per chunk,
    and keeps its valid frames. Attention is bidirectional within windows of n_window_infer
    mel frames. Then ln_post -> proj1 -> GELU -> proj2.
    """

    def __init__(self, cfg: AuTEncoderConfig, config: TransformerConfig, use_te: bool = False):
        super().__init__(config=config)
        self.cfg = cfg
        c, dt = cfg.downsample_hidden_size, config.params_dtype
        self.conv2d1 = nn.Conv2d(1, c, 3, 2, padding=1, dtype=dt)
        self.conv2d2 = nn.Conv2d(c, c, 3, 2, padding=1, dtype=dt)
        self.conv2d3 = nn.Conv2d(c, c, 3, 2, padding=1, dtype=dt)
        freq = conv_stack_length(cfg.num_mel_bins)
        self.conv_out = nn.Linear(c * freq, cfg.hidden_size, bias=False, dtype=dt)
        self.positions = SinusoidalPositions(cfg.max_source_positions, cfg.hidden_size)
        self._init_front_end()
        self.block = TransformerBlock(config=config, spec=encoder_layer_spec(True, use_te),
                                      pre_process=True, post_process=True)  # final LN = ln_post
        self.projector = MLPProjector(config, cfg.hidden_size, cfg.hidden_size, cfg.output_dim)

    @torch.no_grad()
    def _init_front_end(self) -> None:
        """He-normal convolutions and output projection, zero biases. With torch's default
        init each layer shrinks its input about threefold: the front end's output came out
        at ~2% of the sinusoidal positions added to it, and a model trained from scratch
        ignored its audio. Here log-mel input (RMS ~0.5) leaves the front end at RMS ~0.5-1,
        next to the positions' 0.71. Trained checkpoints overwrite all of it."""
        for layer in (self.conv2d1, self.conv2d2, self.conv2d3, self.conv_out):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            if layer.bias is not None:
                layer.bias.zero_()

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        cfg = self.cfg
        chunk = 2 * cfg.n_window
        device, dtype = self.conv_out.weight.device, self.conv_out.weight.dtype
        chunks, chunk_frames, counts = [], [], []
        for f in features:
            frames = f.shape[-1]
            n_chunks = -(-frames // chunk)
            padded = F.pad(f.to(device, dtype), (0, n_chunks * chunk - frames))
            chunks.append(padded.reshape(cfg.num_mel_bins, n_chunks, chunk).permute(1, 0, 2))
            chunk_frames += [chunk] * (n_chunks - 1) + [frames - (n_chunks - 1) * chunk]
            counts.append(aut_audio_tokens(frames, cfg.n_window))
        x = torch.cat(chunks).unsqueeze(1)
        x = F.gelu(self.conv2d1(x))
        x = F.gelu(self.conv2d2(x))
        x = F.gelu(self.conv2d3(x))
        n, ch, fr, t = x.shape
        x = self.conv_out(x.permute(0, 3, 1, 2).reshape(n, t, ch * fr)) + self.positions(t).to(dtype)
        keep = torch.tensor([conv_stack_length(k) for k in chunk_frames], device=device)
        frames = x[torch.arange(t, device=device)[None, :] < keep[:, None]]

        window = cfg.max_source_positions * (cfg.n_window_infer // chunk)
        windows = []
        for count in counts:
            windows += [window] * (count // window) + ([count % window] if count % window else [])
        hidden = self.block(frames.unsqueeze(1), attention_mask=None,
                            packed_seq_params=_packed(windows, device))
        out = self.projector(hidden)[:, 0]
        return out, counts
