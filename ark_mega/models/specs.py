"""Layer recipes (megatron ModuleSpecs) for the decoders and the audio encoders.

`transformer_impl` picks them, as Megatron-LM's `--transformer-impl` does: Transformer Engine
layers (FP8-capable on H100), megatron-core's local layers with `SDPACoreAttention`, or `auto`:
TE when it imports and CUDA is present, local otherwise. Both recipes name their
parameters the megatron way, so one weight map (ark_mega.convert) serves both, up to TE's fused
layer norms (see `te_key`).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .attention import QKVLinearWithoutKeyBias, SDPACoreAttention, rotate_packed


TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
FP8_FORMATS = (None, "hybrid", "e4m3")  # megatron's TransformerConfig.fp8


def te_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def use_transformer_engine(transformer_impl: str, fp8: str | None) -> bool:
    """Whether the layers are TE's; a choice that cannot run here is an error naming it."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl={transformer_impl!r}: expected one of {TRANSFORMER_IMPLS}")
    if fp8 not in FP8_FORMATS:
        raise ValueError(f"fp8={fp8!r}: expected one of {FP8_FORMATS}")
    te_ok = te_available()
    why_not = ("Transformer Engine is not installed" if importlib.util.find_spec("transformer_engine") is None
               else "CUDA is not available")
    if transformer_impl == "transformer_engine" and not te_ok:
        raise ValueError(f"transformer_impl=transformer_engine: {why_not}")
    use_te = transformer_impl == "transformer_engine" or (transformer_impl == "auto" and te_ok)
    if fp8 and not use_te:
        raise ValueError(f"fp8={fp8}: FP8 needs Transformer Engine layers, and here "
                         f"transformer_impl={transformer_impl} gives local layers ({why_not})"
                         if transformer_impl == "auto" else
                         f"fp8={fp8}: FP8 needs transformer_impl=transformer_engine (or auto with "
                         f"Transformer Engine installed), not {transformer_impl}")
    return use_te


def _local_layer(attn_mask_type: AttnMaskType, qk_norm: bool, qkv_linear=ColumnParallelLinear):
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv_linear,
                    core_attention=SDPACoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=WrappedTorchNorm if qk_norm else IdentityOp,
                    k_layernorm=WrappedTorchNorm if qk_norm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                         linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


@functools.cache
def _te_core_attention() -> type:
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class TEPackedRopeAttention(TEDotProductAttention):
        """TE's core attention, rotating packed queries and keys first: megatron's packed RoPE
        (unfused without `apply_rope_fusion`) reads the segment lengths to the host in every
        layer."""

        rotates_packed_queries = True

        def forward(self, query, key, value, *args, packed_seq_params=None, **kwargs):
            query, key = rotate_packed(query, key, packed_seq_params)
            return super().forward(query, key, value, *args,
                                   packed_seq_params=packed_seq_params, **kwargs)

    return TEPackedRopeAttention


def _te_layer(attn_mask_type: AttnMaskType, qk_norm: bool):
    from megatron.core.extensions.transformer_engine import (
        TELayerNormColumnParallelLinear, TENorm, TERowParallelLinear,
    )

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=_te_core_attention(),
                    linear_proj=TERowParallelLinear,
                    q_layernorm=TENorm if qk_norm else IdentityOp,
                    k_layernorm=TENorm if qk_norm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear,
                                         linear_fc2=TERowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def decoder_layer_spec(qk_norm: bool, use_te: bool) -> ModuleSpec:
    """Causal Qwen2 / Qwen3 decoder layer."""
    if use_te:
        return _te_layer(AttnMaskType.causal, qk_norm)
    return _local_layer(AttnMaskType.causal, qk_norm)


def encoder_layer_spec(key_bias: bool, use_te: bool) -> ModuleSpec:
    """Bidirectional pre-LayerNorm encoder layer (attention limited by cu_seqlens windows).

    The Whisper encoder (no key bias) stays on local layers: its masked QKV bias has no TE
    counterpart.
    """
    if use_te and key_bias:
        return _te_layer(AttnMaskType.no_mask, qk_norm=False)
    qkv = ColumnParallelLinear if key_bias else QKVLinearWithoutKeyBias
    return _local_layer(AttnMaskType.no_mask, qk_norm=False, qkv_linear=qkv)


# Local name -> TE name of the layer norms that TE fuses into the following linear layer.
_TE_FUSED_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


def te_key(local_key: str) -> str:
    """The parameter name a TE layer uses for a local layer's parameter name."""
    for local, te in _TE_FUSED_NORMS.items():
        if local_key.endswith(local):
            return local_key[: -len(local)] + te
    return local_key
