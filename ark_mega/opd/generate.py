"""Batched autoregressive generation with a KV cache, inside our megatron model.

Prompts are left-padded to one length, so every row writes its next token at the same cache
position; padded keys are masked out, and since RoPE scores depend only on relative positions
the shift changes nothing. The prompt is prefilled by the model's forward with megatron's static
KV cache; the steps after it run `DecodeStep` on that cache (one CUDA graph replay per step on a
GPU; the model keeps the step, graph included, for its later rollouts of the same batch size and
cache length). Each step runs the pipeline stages in turn (activations sent stage to stage), the
last stage picks the next tokens from the vocab-parallel logits (blocked ids removed; greedy, or
sampling with temperature / top-p among the top-k), and broadcasts them to every stage. The
student's top-k ids at every generated position are kept for the OPD union.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext

from ..config import GenerationConfig
from ..distributed import vocab_shard
from ..kernels import teacher_topk
from ..kernels.teacher_topk import vocab_topk
from ..models.audio_lm import AudioLM
from ..models.decode_step import DecodeKernels, DecodeStep

# cache lengths are rounded up to a multiple of this, so that rollouts of similar prompt widths
# share a decoding step and its CUDA graph; the steps never read past their own position
CACHE_BLOCK = 128


def cache_length(width: int, max_new_tokens: int) -> int:
    """Positions of a rollout's KV cache: the prompt width and the new tokens, rounded up to
    CACHE_BLOCK."""
    return -(-(width + max_new_tokens) // CACHE_BLOCK) * CACHE_BLOCK


@dataclass
class Rollout:
    tokens: list[list[int]]  # generated ids per utterance, stop token excluded
    stopped: list[bool]  # whether the utterance ended with the stop token
    # top-k ids [n_i, k] at each scored position: one per generated token, plus the stop
    # token's position when it was generated. Kept on the last pipeline stage (None elsewhere).
    topk_ids: list[torch.Tensor] | None = None
    steps: int = 0  # decoding steps taken
    cuda_graph: bool = False  # whether the steps after the prefill replayed a CUDA graph


def _received(shape, device, dtype) -> torch.Tensor | None:
    """This stage's input from the previous stage; None on the first stage."""
    if ps.is_pipeline_first_stage():
        return None
    buf = torch.empty(shape, device=device, dtype=dtype)
    dist.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
    return buf


def _sent_on(out: torch.Tensor) -> torch.Tensor | None:
    """The last stage's output (logits); elsewhere `out` goes to the next stage and None back."""
    if ps.is_pipeline_last_stage():
        return out
    dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    return None


def _prefill(model: AudioLM, ids, audio, mask, context, hidden_size, dtype):
    """The prompts' forward through this pipeline stage, filling megatron's KV cache."""
    hidden = _received((ids.shape[1], ids.shape[0], hidden_size), ids.device, dtype)
    if hidden is not None:
        model.set_input_tensor(hidden)
    return _sent_on(model(ids, audio, attention_mask=mask, inference_context=context))


def _decode_stage(decode: DecodeStep, step_ids: torch.Tensor, hidden_size: int, dtype):
    """One decoding step of this pipeline stage."""
    hidden = _received((1, step_ids.shape[0], hidden_size), step_ids.device, dtype)
    return _sent_on(decode(step_ids if hidden is None else hidden))


def _pick(logits: torch.Tensor, blocked: torch.Tensor | None, cfg: GenerationConfig,
          gen: torch.Generator, chunk: int | None = None):
    """Next tokens [b] and the top-k ids [b, k] from this rank's vocabulary shard [b, V/tp]
    (greedy: `chunk` as `vocab_topk`'s)."""
    shard = vocab_shard(logits.shape[-1])
    blocked = None if blocked is None else shard.local(blocked)
    if cfg.greedy:  # contiguous: the tokens are broadcast to the other pipeline stages
        ids = vocab_topk(cfg.top_k, logits, shard.start, shard.group, blocked, chunk)
        return ids[:, 0].contiguous(), ids
    empty = torch.empty(logits.shape[0], 0, dtype=torch.long, device=logits.device)
    top = teacher_topk(cfg.top_k, empty, logits=logits.float(), vocab_start=shard.start,
                       blocked=blocked, tp_group=shard.group)
    probs = torch.softmax(top.logprobs / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:  # keep the smallest prefix whose mass reaches top_p
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before >= cfg.top_p, 0.0)
    # torch.multinomial's own draw for one sample (the same ids on the CPU), written out: on a
    # GPU multinomial checks its input on the host, a wait for the device at every step
    race = torch.empty_like(probs).exponential_(generator=gen)
    choice = (probs / race).argmax(-1, keepdim=True)
    return top.ids.gather(1, choice)[:, 0], top.ids


@torch.no_grad()
def generate(model: AudioLM, prompts: list[list[int]], audio_features: list[torch.Tensor] | None,
             stop_id: int, cfg: GenerationConfig, blocked: torch.Tensor | None = None,
             pad_id: int = 0, kernels: DecodeKernels = DecodeKernels()) -> Rollout:
    """Generate up to `cfg.max_new_tokens` after each prompt. Every rank of the model's
    pipeline calls this with the same prompts; `blocked` is a bool [V] of ids never generated;
    `kernels`: the choices of kernels (benchmarks compare them)."""
    if cfg.top_k is None:
        raise ValueError("GenerationConfig.top_k is unset (a run config sets it to opd.top_k)")
    if not prompts or not all(prompts):
        raise ValueError("generate needs at least one prompt, and no empty one")
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompts, audio_features, stop_id, cfg, blocked, pad_id, kernels)
    finally:
        model.train(was_training)


def _generate(model, prompts, audio_features, stop_id, cfg, blocked, pad_id, kernels) -> Rollout:
    device = next(model.parameters()).device
    b, width = len(prompts), max(len(p) for p in prompts)
    max_len = cache_length(width, cfg.max_new_tokens)
    ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    is_pad = torch.ones(b, max_len, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        is_pad[i, width - len(p):] = False
    # A padded query attends to itself only, so that no row of the softmax is empty.
    own = torch.eye(width, dtype=torch.bool, device=device)
    prefill_mask = (is_pad[:, None, None, :width] & ~own)
    context = StaticInferenceContext(max_batch_size=b, max_sequence_length=max_len)
    hidden_size, dtype = model.config.hidden_size, model.config.params_dtype
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    last = ps.is_pipeline_last_stage()
    pp_last_rank = ps.get_pipeline_model_parallel_last_rank()

    out = _prefill(model, ids, audio_features, prefill_mask, context, hidden_size, dtype)
    logits = out[-1] if last else None
    decode = None
    picked, step_topk = [], []  # per step: the tokens [b], and their top-k ids [b, k] (last stage)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    # Between reads of the tokens the host queues steps ahead of the GPU; a row that stopped
    # meanwhile decodes padding. On the CPU each op runs as it is called: read every step.
    check_every = cfg.check_every or (8 if device.type == "cuda" else 1)
    steps = 0
    for steps in range(1, cfg.max_new_tokens + 1):
        nxt = torch.empty(b, dtype=torch.long, device=device)
        if last:
            nxt, top = _pick(logits, blocked, cfg, gen, kernels.pick_chunk)
            step_topk.append(top)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(nxt, src=pp_last_rank, group=ps.get_pipeline_model_parallel_group())
        picked.append(nxt)
        done |= nxt == stop_id
        if steps == cfg.max_new_tokens or (steps % check_every == 0 and bool(done.all())):
            break
        if decode is None:
            decode = DecodeStep.for_rollout(model, context, is_pad, width, cfg.cuda_graph,
                                            kernels)
        logits = _decode_stage(decode, torch.where(done, pad_id, nxt), hidden_size, dtype)
    tokens, stopped = _until_stop(torch.stack(picked, 1).tolist(), stop_id)
    topk = None
    if last:  # row i was scored at its generated tokens and at its stop token, if any
        stacked = torch.stack(step_topk)
        topk = [stacked[:len(t) + end, i] for i, (t, end) in enumerate(zip(tokens, stopped))]
    graphed = decode is not None and decode.graph is not None
    return Rollout(tokens, stopped, topk, steps, graphed)


def _until_stop(rows: list[list[int]], stop_id: int) -> tuple[list[list[int]], list[bool]]:
    """Each row's tokens before its first stop token, and whether it has one."""
    cut = [row.index(stop_id) if stop_id in row else len(row) for row in rows]
    return [row[:n] for row, n in zip(rows, cut)], [n < len(row) for row, n in zip(rows, cut)]
