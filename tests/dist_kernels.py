"""Run under torchrun with 2 processes (gloo, CPU): the vocab-parallel kernels (and SFT's linear
cross-entropy) at TP = 2 equal TP = 1.   torchrun --nproc_per_node 2 tests/dist_kernels.py"""

from __future__ import annotations

import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron.core import parallel_state as ps  # noqa: E402

from ark_mega.distributed import ParallelConfig, init_parallel  # noqa: E402
from dist_common import finish  # noqa: E402
from ark_mega.cross_entropy import linear_cross_entropy  # noqa: E402
from ark_mega.kernels import sparse_lm_head, teacher_topk  # noqa: E402
from ark_mega.kernels.teacher_topk import vocab_topk  # noqa: E402

N, H, V, K = 13, 24, 64, 8


def main() -> int:
    init_parallel(ParallelConfig(tensor_parallel=2))
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    gen = torch.Generator().manual_seed(0)  # same inputs on both ranks
    hidden, weight = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen)
    ids = torch.randint(0, V, (N, 2 * K), generator=gen)
    ids[torch.rand(N, 2 * K, generator=gen) < 0.2] = -1
    g = torch.randn(N, 2 * K, generator=gen)
    v_local = V // size
    start = rank * v_local
    results = {}

    # sparse LM head: forward and both gradients
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    full = sparse_lm_head(h1, w1, ids, impl="triton")
    (full * g).sum().backward()
    h2 = hidden.clone().requires_grad_()
    w2 = weight[start:start + v_local].clone().requires_grad_()
    part = sparse_lm_head(h2, w2, ids, vocab_start=start, tp_group=ps.get_tensor_model_parallel_group(),
                          impl="triton")
    (part * g).sum().backward()
    results["sparse_lm_head"] = max(
        (part - full).abs().max().item(), (h2.grad - h1.grad).abs().max().item(),
        (w2.grad - w1.grad[start:start + v_local]).abs().max().item())

    # SFT's linear cross-entropy: loss and both gradients
    labels = torch.randint(0, V, (N,), generator=gen)
    mask = torch.rand(N, generator=gen) < 0.7
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    full = linear_cross_entropy(h1, w1, labels, mask, rows=4)
    (full * 0.3).backward()
    h2 = hidden.clone().requires_grad_()
    w2 = weight[start:start + v_local].clone().requires_grad_()
    part = linear_cross_entropy(h2, w2, labels, mask, start, ps.get_tensor_model_parallel_group(),
                                rows=4)
    (part * 0.3).backward()
    results["linear_cross_entropy"] = max(
        (part - full).abs().item(), (h2.grad - h1.grad).abs().max().item(),
        (w2.grad - w1.grad[start:start + v_local]).abs().max().item())

    # teacher top-k from logits and from hidden states
    student = torch.randint(0, V, (N, K), generator=gen)
    logits = hidden @ weight.t()
    one = teacher_topk(K, student, logits=logits, impl="triton")
    group = ps.get_tensor_model_parallel_group()
    for name, kwargs in (("teacher_topk_logits", dict(logits=logits[:, start:start + v_local])),
                         ("teacher_topk_hidden", dict(hidden=hidden, chunk=16,
                                                      weight=weight[start:start + v_local]))):
        two = teacher_topk(K, student, vocab_start=start, tp_group=group, impl="triton", **kwargs)
        same_ids = torch.equal(one.ids, two.ids)
        err = max((one.logprobs - two.logprobs).abs().max().item(),
                  (one.logprobs_at_student - two.logprobs_at_student).abs().max().item())
        results[name] = err if same_ids else float("inf")

    # greedy decoding's top-k ids (blocked ids never taken): the shards' merge is the whole's,
    # each shard's selection in one pass or in chunks
    blocked = torch.zeros(V, dtype=torch.bool)
    blocked[::5] = True
    whole = (vocab_topk(K, logits, blocked=blocked), logits.masked_fill(blocked, float("-inf")))
    two, two_chunked = (vocab_topk(K, logits[:, start:start + v_local], start, group,
                                   blocked[start:start + v_local], chunk) for chunk in (None, 16))
    same = (torch.equal(whole[0], two) and torch.equal(whole[0], two_chunked)
            and torch.equal(whole[0], whole[1].topk(K).indices))
    results["vocab_topk"] = 0.0 if same else float("inf")

    ok = all(e <= 1e-5 for e in results.values())
    if rank == 0:
        print(json.dumps({"max_abs_diff": results, "passed": ok}), flush=True)
    return finish(ok)


if __name__ == "__main__":
    sys.exit(main())
