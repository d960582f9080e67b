"""One decoding step of an AudioLM pipeline stage over a static KV cache, capturable as a CUDA
graph.

megatron's static inference path slices its KV cache with a Python offset and re-applies RoPE to
every cached key at every step, so each step is a new sequence of ~1,300 kernel launches through
Python (docs/benchmarks.md: decoding ran at 14% GPU utilisation). Here the write position is a
device tensor and every shape is fixed for the whole rollout, so the step is one CUDA graph
replayed once per token. The step calls the layers' own modules (norms, q/k norms, output
projections, embedding, output layer) and their QKV and first MLP projections' weights, and
does only the attention itself with the step's RoPE and cache write
(`ark_mega.kernels.decode_attention`), a local SwiGLU MLP's first projection with its
activation (`ark_mega.kernels.swiglu_linear`), a local layer's output projections at one
tensor-parallel rank as partial sums over slices of their input
(`ark_mega.kernels.split_k_linear`) and, for torch's RMSNorm, each residual add with the norm
that follows it, summing those partials (`ark_mega.kernels.add_rms_norm`).

Rows are left-padded to one prompt length, so every row writes at the same position; padded keys
and the positions not yet written are masked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch
import torch.nn.functional as F
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.utils import get_pg_size

from ..kernels import compiled_only
from ..kernels.add_rms_norm import add_rms_norm, whole
from ..kernels.decode_attention import decode_attention
from ..kernels.rope import rope_tables
from ..kernels.split_k_linear import split_k_linear
from ..kernels.swiglu_linear import swiglu_linear


# a model keeps the steps of its most recent rollout shapes (batch size, cache length) for later
# rollouts: at most this many, with caches of at most KEPT_CACHE_BYTES together (the current
# rollout's is kept whatever its size; 64 rows x 1,024 positions are 0.75 GiB for ark_asr_0p6b,
# 7 GiB for a Qwen3-ASR 1.7B)
KEPT_STEPS = 4
KEPT_CACHE_BYTES = 4 * 2**30


@dataclasses.dataclass(frozen=True)
class DecodeKernels:
    """A rollout's choices between two ways of computing the same thing. The defaults are what
    rollouts run; `tools/bench_decode.py` times each alternative in the same run."""

    # the attention's splits of each row's cache (`decode_attention`'s `splits`): None for
    # enough programs per SM (flash-decoding), 1 for one program per row and key group
    attention_splits: int | None = None
    # a local SwiGLU MLP's first projection and activation in one Triton launch; False: the
    # MLP's own modules (cuBLAS, then SwiGLU; its output projection too)
    fused_mlp: bool = True
    # a local layer's output projections (attention, MLP) at one TP rank as float32 partial
    # sums over slices of their input, which the residual add after them sums; False: cuBLAS's
    split_k_projections: bool = True
    # the greedy pick's top k after the step (`vocab_topk`'s `chunk`, in `generate`): None for
    # one selection over each row's vocabulary, N for each N ids' top k first
    pick_chunk: int | None = None


class DecodeStep:
    """Steps after the prefill, for rollouts of one batch size and cache length. `start` (called
    at construction) takes a rollout's prefilled cache from `context`, megatron's
    StaticInferenceContext (keys before RoPE, [max_len, b, ng, hn] per layer), into this step's
    ([b, ng, max_len, hn], keys rotated) and releases it; `key_padded` [b, max_len] is True at
    left-padding positions; `position` is where the first step's token goes (the prompt width).
    `for_rollout` reuses a model's step of the same shape, so its CUDA graph is captured once,
    not once per rollout.

    On the first pipeline stage a step takes token ids [b]; on the others the previous stage's
    hidden states [1, b, h]. On the last stage it returns logits [b, V/tp], elsewhere the hidden
    states to send on. With `cuda_graph` on a CUDA device the first call runs eagerly and the
    second captures the layers; every later call, in this rollout and later ones, replays them
    (the graph reads the weights where they are, which training updates in place). The token
    embedding stays outside the graph: at TP > 1 megatron's vocab-parallel lookup masks by
    boolean indexing, which waits for the GPU."""

    def __init__(self, model, context, key_padded: torch.Tensor, position: int,
                 cuda_graph: bool = False, kernels: DecodeKernels = DecodeKernels()):
        gpt = model.gpt
        # weak: the model keeps its steps (`for_rollout`), and a cycle would hold their caches
        # and graphs until the garbage collector's next full pass
        self.model, self.config = weakref.proxy(model), gpt.config
        if self.config.sequence_parallel or self.config.context_parallel_size != 1:
            raise ValueError("the decoding step does not support sequence or context parallelism")
        if self.config.rotary_interleaved:
            raise ValueError("the decoding step's RoPE is half-split, not interleaved")
        self.layers = list(gpt.decoder.layers)
        self.final_norm = gpt.decoder.final_layernorm if model.post_process else None
        if model.post_process and self.final_norm is None:  # None means: not the last stage
            raise ValueError("the decoding step needs the decoder's final norm")
        b, max_len = key_padded.shape
        device, dtype = key_padded.device, self.config.params_dtype
        self.freqs = gpt.rotary_pos_emb(max_len)  # [max_len, 1, 1, rot_dim]
        self.cos, self.sin = rope_tables(self.freqs, dtype)
        self.caches = []
        for layer in self.layers:
            _, _, groups, hn = context.key_value_memory_dict[layer.layer_number][0].shape
            self.caches.append(tuple(torch.empty(b, groups, max_len, hn, device=device,
                                                 dtype=dtype) for _ in range(2)))
        self.padding = torch.empty(b, 1, 1, max_len, device=device, dtype=dtype)
        self.position = torch.empty(1, dtype=torch.long, device=device)
        self.input = torch.zeros(1, b, self.config.hidden_size, device=device, dtype=dtype)
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self.kernels = kernels
        self.graph = self.output = None
        self.calls = 0
        self.start(context, key_padded, position)

    @classmethod
    def for_rollout(cls, model, context, key_padded: torch.Tensor, position: int,
                    cuda_graph: bool = False, kernels: DecodeKernels = DecodeKernels()
                    ) -> "DecodeStep":
        """The model's step for this rollout's batch size, cache length and kernels, started on
        its prefill: the one an earlier rollout made (with its graph), else a new one, made after
        the least recently used steps past KEPT_STEPS and KEPT_CACHE_BYTES are dropped."""
        kept = model.__dict__.setdefault("decode_steps", {})  # not a module: no state_dict
        # the pick runs after the step: steps that differ in it alone are one
        key = (tuple(key_padded.shape), key_padded.device, cuda_graph,
               dataclasses.replace(kernels, pick_chunk=None))
        step = kept.pop(key, None)
        if step is None:
            size = sum(t.nbytes for kv in context.key_value_memory_dict.values() for t in kv)
            while kept and (len(kept) >= KEPT_STEPS
                            or sum(s.cache_bytes for s in kept.values()) + size
                            > KEPT_CACHE_BYTES):
                kept.pop(next(iter(kept)))
            step = cls(model, context, key_padded, position, cuda_graph, kernels)
        else:
            step.start(context, key_padded, position)
        kept[key] = step
        return step

    @staticmethod
    def release(model) -> None:
        """Drop the model's kept steps (their caches and graphs): after decoding batches of
        shapes training will not see again (evaluation, transcription)."""
        model.__dict__.pop("decode_steps", None)

    @property
    def cache_bytes(self) -> int:
        return sum(t.nbytes for kv in self.caches for t in kv)

    @torch.no_grad()
    def start(self, context, key_padded: torch.Tensor, position: int) -> None:
        """A rollout's buffers: its prefilled cache (keys rotated), padding and first position."""
        freqs = self.freqs[:position]
        for layer, (keys, values) in zip(self.layers, self.caches):
            prefilled_keys, prefilled_values = context.key_value_memory_dict.pop(layer.layer_number)
            rotated = apply_rotary_pos_emb(prefilled_keys[:position], freqs, config=self.config)
            keys[:, :, :position] = rotated.permute(1, 2, 0, 3)
            values[:, :, :position] = prefilled_values[:position].permute(1, 2, 0, 3)
            # the positions after are never attended to (masked by the reference, not read by
            # the kernel), but must be finite: uninitialised memory, or an earlier rollout's
            # NaNs, would still reach the reference's output through 0 * NaN
            keys[:, :, position:].zero_()
            values[:, :, position:].zero_()
        # additive; the attention masks the positions after the step's
        self.padding.zero_().masked_fill_(key_padded[:, None, None, :], float("-inf"))
        self.position.fill_(position)

    @torch.no_grad()
    def __call__(self, step_input: torch.Tensor) -> torch.Tensor:
        if self.model.pre_process:
            step_input = self.model.gpt.embedding(input_ids=step_input[:, None], position_ids=None)
        self.input.copy_(step_input)
        self.calls += 1
        if not self.cuda_graph:
            return self._forward()
        if self.graph is not None:
            self.graph.replay()
            return self.output
        if self.calls == 1:  # warm-up: kernels and library workspaces chosen outside capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._forward()
            torch.cuda.current_stream().wait_stream(side)
            return out
        graph = torch.cuda.CUDAGraph()
        try:
            # thread-local: CUDA calls of other threads (a data loader pinning memory) neither
            # break the capture nor are refused during it
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                output = self._forward()
        except Exception as e:  # the step keeps no graph: a later call captures again
            raise RuntimeError(
                f"capturing the decoding step as a CUDA graph failed ({e}); set "
                f"opd.generation.cuda_graph: false to decode without graphs") from e
        self.graph, self.output = graph, output
        self.graph.replay()
        return self.output

    def _forward(self) -> torch.Tensor:
        hidden = self.input
        with get_fp8_context(self.config) if self.config.fp8 else contextlib.nullcontext():
            normed = self.layers[0].input_layernorm(hidden)
            for i, (layer, cache) in enumerate(zip(self.layers, self.caches)):
                following = (self.layers[i + 1].input_layernorm if i + 1 < len(self.layers)
                             else self.final_norm)
                hidden, normed = self._layer(layer, hidden, normed, cache, following)
        self.position.add_(1)
        if self.final_norm is None:
            return hidden
        return self.model.logits(normed)[0]

    def _layer(self, layer, hidden, normed, cache, following):
        """The layer on `hidden` (`normed`: its input norm's output): the residual stream after
        it and that stream through `following` (the next layer's input norm, the final norm, or
        None on a stage's last layer before another stage)."""
        attention = layer.self_attention
        query, key, value = self._qkv(attention, normed)
        context = decode_attention(query, key, value, self.cos, self.sin, self.position, *cache,
                                   self.padding, self.config.softmax_scale,
                                   impl=compiled_only(normed),
                                   splits=self.kernels.attention_splits)
        hidden, normed = add_and_norm(hidden, self._projection(attention.linear_proj, context),
                                      layer.pre_mlp_layernorm)
        return add_and_norm(hidden, self._mlp(layer.mlp, normed), following)

    def _projection(self, linear, x):
        """A row-parallel linear's output, its bias added: a local one's at one TP rank as
        float32 partial sums over slices of `x` (`ark_mega.kernels.split_k_linear`), for the
        residual add after it to sum; otherwise the layer's own."""
        if (self.kernels.split_k_projections and isinstance(linear, RowParallelLinear)
                and linear.bias is None and linear.input_is_parallel
                and get_pg_size(linear.tp_group) == 1 and not linear.explicit_expert_comm
                and linear.weight.dtype == x.dtype and not self.config.fp8):
            return split_k_linear(x, linear.weight, impl=compiled_only(x))
        return with_bias(*linear(x))

    def _mlp(self, mlp, normed):
        """The layer's MLP, its bias added; a local SwiGLU one's first projection and activation
        in one launch (`ark_mega.kernels.swiglu_linear`), its output projection as
        `_projection`'s."""
        fc1, cfg = getattr(mlp, "linear_fc1", None), self.config
        if (self.kernels.fused_mlp and isinstance(fc1, ColumnParallelLinear) and fc1.bias is None
                and not fc1.gather_output and fc1.weight.dtype == normed.dtype
                and cfg.gated_linear_unit
                and mlp.activation_func is F.silu and not cfg.use_te_activation_func
                and cfg.activation_func_clamp_value is None and cfg.glu_linear_offset == 0
                and not cfg.fp8):
            return self._projection(mlp.linear_fc2,
                                    swiglu_linear(normed, fc1.weight, impl=compiled_only(normed)))
        return with_bias(*mlp(normed))

    def _qkv(self, attention, normed):
        """The step's query heads [1, b, groups, per_group, hn], key and value [1, b, groups,
        hn]. Without q / k norms they are views of the QKV projection, whose query heads
        megatron's split would copy, and a local projection adds its bias in its matmul (one
        launch where megatron's linear takes two, and one rounding where it has two)."""
        groups = attention.num_query_groups_per_partition
        per_group = attention.num_attention_heads_per_partition // groups
        hn = attention.hidden_size_per_attention_head
        normed_heads = any(norm is not None and not isinstance(norm, IdentityOp)
                           for norm in (attention.q_layernorm, attention.k_layernorm))
        if normed_heads or self.config.num_query_groups < attention.world_size:
            query, key, value = attention.get_query_key_value_tensors(normed, None)[:3]
            # with fewer key groups than TP ranks this rank keeps 1 group and only its own
            # share of that group's query heads (heads / TP, not heads / groups)
            return query.unflatten(2, (groups, -1)), key, value
        linear = attention.linear_qkv
        if isinstance(linear, ColumnParallelLinear) and not (linear.skip_bias_add
                                                             or linear.gather_output):
            mixed = F.linear(normed, linear.weight, linear.bias)  # this rank's heads
        else:
            mixed, _ = linear(normed)
        mixed = mixed.unflatten(-1, (groups, (per_group + 2) * hn))
        return (mixed[..., :per_group * hn].unflatten(-1, (per_group, hn)),
                mixed[..., per_group * hn:(per_group + 1) * hn], mixed[..., (per_group + 1) * hn:])


def with_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A megatron module's (output, bias to add) as one tensor."""
    return out if bias is None else out + bias


def add_and_norm(hidden: torch.Tensor, delta: torch.Tensor, norm):
    """hidden + delta (or float32 partial sums of delta, `_projection`'s), and `norm` of it
    (None: no norm); torch's RMSNorm (the local layers') with the add in one launch on a GPU
    (`ark_mega.kernels.add_rms_norm`)."""
    if isinstance(norm, torch.nn.RMSNorm):
        return add_rms_norm(hidden, delta, norm.weight, norm.eps, impl=compiled_only(hidden))
    total = hidden + whole(hidden, delta)
    return total, None if norm is None else norm(total)

