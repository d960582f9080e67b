"""Run under torchrun with 2 processes (gloo, CPU): greedy generation at TP = 2 with the
decoding step equals recomputing the whole sequence at every step, for the tiny student with
2 key/value heads and with 1 (fewer than the TP ranks: megatron gathers the QKV projection and
each rank keeps its half of the query heads, all of them in one key group).

    torchrun --nproc_per_node 2 tests/dist_generate.py
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron.core import parallel_state as ps  # noqa: E402

from ark_mega.config import GenerationConfig  # noqa: E402
from ark_mega.data import PromptBuilder  # noqa: E402
from ark_mega.distributed import ParallelConfig, init_parallel  # noqa: E402
from ark_mega.opd.generate import generate  # noqa: E402
from dist_common import finish  # noqa: E402
from opd_setup import batch, model, tokenizer  # noqa: E402

STEPS = 6


def full_logits(student, seq, feats) -> torch.Tensor:
    """The last position's logits over the whole vocabulary (gathered over TP)."""
    with torch.no_grad():
        out = student(torch.tensor([seq]), [feats])[-1, 0]
    parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts)


def recomputed(student, prompt, feats, stop_id) -> list[int]:
    seq, tokens = list(prompt), []
    for _ in range(STEPS):
        nxt = int(full_logits(student, seq, feats).argmax())
        if nxt == stop_id:
            break
        tokens.append(nxt)
        seq.append(nxt)
    return tokens


def main() -> int:
    init_parallel(ParallelConfig(tensor_parallel=2))
    sp = PromptBuilder.student(tokenizer())
    b = batch(sp)
    prompts = [sp.build(f.shape[-1]).input_ids for f in b.audio_features]
    for kv_heads in (2, 1):
        student = model("tiny_ark_asr", sp, seed=0, scale=3.0, kv_heads=kv_heads).eval()
        out = generate(student, prompts, b.audio_features, sp.stop_id,
                       GenerationConfig(max_new_tokens=STEPS, top_k=4))
        want = [recomputed(student, p, f, sp.stop_id) for p, f in zip(prompts, b.audio_features)]
        if dist.get_rank() == 0:
            print(json.dumps({"kv_heads": kv_heads, "tokens": out.tokens, "recomputed": want}),
                  flush=True)
    return finish(True)


if __name__ == "__main__":
    sys.exit(main())
