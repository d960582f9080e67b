"""The decoding step after the prefill (ark_mega.models.decode_step): its attention against the
standard grouped-query form, and on a GPU the CUDA-graph replay against eager decoding.
Generation against a full recomputation: tests/test_opd.py."""

import pytest
import torch
import torch.nn.functional as F

from ark_mega.config import GenerationConfig
from ark_mega.data import PromptBuilder
from ark_mega.kernels.decode_attention import cached_attention
from ark_mega.models.decode_step import attention_bias
from ark_mega.opd.generate import generate
from opd_setup import batch, model, tokenizer


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("impl,dtype", [("torch", torch.float32), ("triton", torch.float32),
                                        ("triton", torch.bfloat16)])
@pytest.mark.parametrize("b,heads,groups,hn,max_len", [(3, 6, 2, 8, 11), (2, 14, 2, 64, 130)])
def test_cached_attention_is_grouped_query_attention_over_the_unmasked_keys(impl, dtype, b, heads,
                                                                            groups, hn, max_len):
    """Both ways (SDPA per key group; the kernel, compiled on a GPU and through Triton's
    interpreter on the CPU), at a toy shape and at Ark-ASR's (7 query heads per group, heads of
    64) with a cache longer than two of the kernel's blocks and one row whose first 70 keys
    are padding; in bf16 (GPU only) against float32 on the same bf16-rounded inputs."""
    if dtype == torch.bfloat16 and DEV.type != "cuda":
        pytest.skip("bf16 tiles run compiled on a GPU only")
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, b, heads, hn, generator=gen).to(dtype).float()
    keys, values = (torch.randn(b, groups, max_len, hn, generator=gen).to(dtype).float()
                    for _ in range(2))
    blocked = torch.rand(b, 1, 1, max_len, generator=gen) < 0.4
    blocked[..., 0] = False  # every row keeps a key
    if max_len > 70:  # left padding spanning a whole block of 64 keys
        blocked[0, ..., :70] = True
        blocked[0, ..., 70] = False
    bias = attention_bias(blocked, query.dtype)
    # rows 16-aligned at 11 keys: CUDA's memory-efficient attention would copy it otherwise
    assert bias.shape == blocked.shape and all(st % 16 == 0 for st in bias.stride()[:-1])
    # each query head h reads key group h // (heads / groups), as repeat_interleave expands it
    per_group = heads // groups
    ref = F.scaled_dot_product_attention(
        query[0][:, :, None, :],  # [b, heads, 1, hn]
        keys.repeat_interleave(per_group, 1), values.repeat_interleave(per_group, 1),
        attn_mask=~blocked).reshape(1, b, heads * hn)

    def run(keys):
        on = [t.to(DEV, dtype) for t in (query, keys, values)]
        return cached_attention(*on, attention_bias(blocked.to(DEV), dtype), None,
                                impl=impl).float().cpu()

    got = run(keys)
    assert torch.allclose(got, ref, atol=1e-5 if dtype == torch.float32 else 2e-2)
    # a masked key changes nothing, whatever it holds
    row, pos = blocked[:, 0, 0].nonzero()[0].tolist()
    keys[row, :, pos] = 1e4
    assert torch.allclose(run(keys), got, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name,builder", [("tiny_ark_asr", PromptBuilder.student),
                                          ("tiny_qwen3_asr", PromptBuilder.teacher)])
def test_cuda_graph_decoding_equals_eager_decoding(single_rank, name, builder):
    sp = builder(tokenizer())
    m = model(name, sp, seed=0, scale=3.0, dtype=torch.bfloat16).cuda().eval()
    b = batch(sp)
    feats = [f.cuda().to(torch.bfloat16) for f in b.audio_features]
    prompts = [sp.build(f.shape[-1]).input_ids for f in feats]
    outs = [generate(m, prompts, feats, sp.stop_id,
                     GenerationConfig(max_new_tokens=8, top_k=4, cuda_graph=graph))
            for graph in (False, True)]
    assert not outs[0].cuda_graph and outs[1].cuda_graph
    assert outs[0].tokens == outs[1].tokens
    assert all(torch.equal(a, b) for a, b in zip(outs[0].topk_ids, outs[1].topk_ids))
