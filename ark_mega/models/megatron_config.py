"""Our model shapes -> megatron-core TransformerConfig."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from .config import AuTEncoderConfig, DecoderConfig, WhisperEncoderConfig


RECOMPUTE = ("none", "selective", "full")


def _recompute(mode: str) -> dict:
    """Activation recomputation, as Megatron-LM's --recompute-granularity: `selective` recomputes
    core attention in backward (its saved score-sized tensors), `full` every layer (only each
    layer's input is kept)."""
    if mode not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {mode!r}")
    if mode == "none":
        return {}
    if mode == "selective":
        return dict(recompute_granularity="selective")
    return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def _common(dtype: torch.dtype, fp8: str | None, recompute: str = "none") -> dict:
    on_gpu = torch.cuda.is_available()
    return dict(
        **_recompute(recompute),
        fp8=fp8,  # None, or the FP8 format of TE's layers (delayed scaling, megatron's default)
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # CPU init draws each full weight from the global RNG before sharding it, so a model
        # is initialised identically at every TP size; GPU init draws shards on the device.
        use_cpu_initialization=not on_gpu,
        # The fusions below need CUDA kernels (apex / TE / triton) that the CPU path lacks, or
        # compile with torch.compile (~30 s per process on the CPU).
        bias_activation_fusion=False,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
    )


def decoder_config(cfg: DecoderConfig, dtype: torch.dtype = torch.float32,
                   fp8: str | None = None, recompute: str = "none") -> TransformerConfig:
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        num_query_groups=cfg.num_kv_heads,
        kv_channels=cfg.kv_channels,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        qk_layernorm=cfg.qk_norm,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        # packed micro-batches differ in length: the stages exchange each tensor's shape first.
        # megatron refuses that with its default MoE dispatcher even in a dense model (no
        # experts here, so the dispatcher named is never built)
        variable_seq_lengths=parallel_state.get_pipeline_model_parallel_world_size() > 1,
        moe_token_dispatcher_type="alltoall",
        # on a GPU, SwiGLU as one compiled kernel each way (megatron's bias_swiglu) instead of
        # chunk, silu, `+ glu_linear_offset` and mul, saving only its input for backward. The
        # encoders' GELU stays unfused: megatron's fused one is the tanh approximation.
        **{**_common(dtype, fp8, recompute), "bias_activation_fusion": torch.cuda.is_available()},
    )


def encoder_config(cfg: WhisperEncoderConfig | AuTEncoderConfig,
                   dtype: torch.dtype = torch.float32, fp8: str | None = None,
                   recompute: str = "none") -> TransformerConfig:
    """Encoders live whole on the first pipeline stage: pipeline size 1 for their blocks."""
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="LayerNorm",
        layernorm_epsilon=cfg.layernorm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=F.gelu,
        pipeline_model_parallel_size=1,
        **_common(dtype, fp8, recompute),
    )
