"""Attention parts for the local (non-Transformer-Engine) layer specs.

megatron-core's own local `DotProductAttention` rejects packed (THD) sequences, which both the
packed decoder batches and the windowed / per-utterance encoders need. `SDPACoreAttention` is a
drop-in `core_attention` submodule built on `torch.nn.functional.scaled_dot_product_attention`
that takes padded (SBHD) and packed (THD, cu_seqlens) inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """softmax(q k^T * scale + mask) v per head, causal or bidirectional, padded or packed.

    Shapes follow megatron's core-attention contract: SBHD q [s, b, np, hn], k/v [s, b, ng, hn]
    -> [s, b, np * hn]; THD q [t, np, hn], k/v [t, ng, hn] -> [t, np * hn].
    `attention_mask` (SBHD only) is megatron's boolean mask: True where attention is *blocked*.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale  # None: 1/sqrt(head_dim), SDPA's default
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params: PackedSeqParams | None = None):
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not take an attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        dropout = self.dropout_p if self.training else 0.0

        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._packed(query, key, value, packed_seq_params, causal, dropout)

        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        mask = None
        if attention_mask is not None:
            mask = ~attention_mask.bool()
            if causal:  # SDPA takes is_causal or a mask, not both
                s_q, s_k = q.shape[2], k.shape[2]
                mask = mask & torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril()
                causal = False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
            scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1],
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _packed(self, query, key, value, params, causal, dropout):
        cu_q = params.cu_seqlens_q.tolist()
        cu_k = params.cu_seqlens_kv.tolist()
        outs = []
        for i in range(len(cu_q) - 1):
            # [t_i, n, d] -> [1, n, t_i, d]
            q = query[cu_q[i]:cu_q[i + 1]].transpose(0, 1).unsqueeze(0)
            k = key[cu_k[i]:cu_k[i + 1]].transpose(0, 1).unsqueeze(0)
            v = value[cu_k[i]:cu_k[i + 1]].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )
            outs.append(o[0].transpose(0, 1))
        out = torch.cat(outs, dim=0)
        return out.reshape(out.shape[0], -1)


class QKVLinearWithoutKeyBias(ColumnParallelLinear):
    """Fused QKV projection whose query and value parts have a bias and whose key part has none.

    The Whisper / GLM-ASR encoder has no key bias. With partial RoPE a key bias would not
    cancel in the softmax, so it must stay exactly zero: the bias is multiplied by a fixed 0/1
    mask, which also zeroes its gradient. Layout per query group (megatron's):
    [q heads of the group | k | v], each head `kv_channels` wide.
    """

    def __init__(self, input_size, output_size, *, config: TransformerConfig, **kwargs):
        kwargs["skip_bias_add"] = True
        kwargs["bias"] = True
        super().__init__(input_size, output_size, config=config, **kwargs)
        hn = config.kv_channels
        q_per_group = config.num_attention_heads // config.num_query_groups
        group_width = (q_per_group + 2) * hn
        groups_here = self.output_size_per_partition // group_width
        group_mask = torch.ones(group_width)
        group_mask[q_per_group * hn:(q_per_group + 1) * hn] = 0.0
        self.register_buffer("bias_mask", group_mask.repeat(groups_here), persistent=False)
        self.key_bias_entries = groups_here * hn  # bias entries held at zero

    def forward(self, input_, weight=None, runtime_gather_output=None):
        out, bias = super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        return out + bias * self.bias_mask.to(bias.dtype), None
