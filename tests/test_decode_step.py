"""The decoding step after the prefill (ark_mega.models.decode_step): its attention with RoPE and
the cache write against float64 from the definitions, and on a GPU the CUDA-graph replay against
eager decoding. Generation against a full recomputation: tests/test_opd.py."""

import pytest
import torch
import torch.nn.functional as F

from ark_mega.config import GenerationConfig
from ark_mega.data import PromptBuilder
from ark_mega.kernels.decode_attention import decode_attention
from ark_mega.kernels.rope import rope_tables
from ark_mega.kernels.split_k_linear import default_splits, slice_width, split_k_linear
from ark_mega.kernels.swiglu_linear import swiglu_linear
from ark_mega.models import decode_step
from ark_mega.models.decode_step import KEPT_STEPS, DecodeKernels, DecodeStep
from ark_mega.opd.generate import generate
from opd_setup import batch, model, tokenizer


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rotated(x, angles, rot):
    """float64, from the definition: x cos + rotate_half(x) sin on the first `rot` dims."""
    x, c, s = x.double(), angles.double().cos(), angles.double().sin()
    x1, x2 = x[..., :rot // 2], x[..., rot // 2:rot]
    return torch.cat((x[..., :rot] * c + torch.cat((-x2, x1), -1) * s, x[..., rot:]), -1)


@pytest.mark.parametrize("impl,dtype", [("torch", torch.float32), ("triton", torch.float32),
                                        ("triton", torch.bfloat16)])
@pytest.mark.parametrize("b,groups,per_group,hn,rot,max_len,pos,pad",
                         [(3, 2, 3, 12, 12, 11, 7, 0), (3, 2, 2, 12, 8, 11, 4, 0),
                          (2, 1, 3, 16, 6, 9, 0, 0), (2, 2, 7, 64, 64, 150, 133, 130),
                          (2, 2, 7, 64, 64, 150, 40, 130), (2, 2, 7, 64, 64, 300, 280, 200)])
@pytest.mark.parametrize("splits", [None, 3])
def test_decode_attention_rotates_writes_the_cache_and_attends_up_to_the_position(
        impl, dtype, b, groups, per_group, hn, rot, max_len, pos, pad, splits):
    """Both ways (RoPE, cache write and SDPA per key group; the kernel, compiled on a GPU and
    through Triton's interpreter on the CPU) against float64 from the definitions: query heads
    and key rotated at the position (full and partial rotary widths), key and value written
    there and nowhere else, each query head attending to its key group's unmasked positions up
    to the step's own. q / k / v are strided views of one fused projection, as the decoding
    step passes them. Shapes: toy ones, the first step after an empty cache, and Ark-ASR's
    (7 query heads per group, heads of 64) with more than two of the kernel's blocks of
    positions before the step and one row whose first `pad` keys are padding; in bf16 (GPU only)
    against float64 on the same bf16-rounded inputs. The kernel with the positions before the
    step in one part (None on the CPU) and in 3 merged ones (blocks of 64: parts of 64, 64 and 5
    positions at 133, one of padding alone; of 64 at 40, two past the position; of 128 at 280,
    the second's first block padding alone and its second not)."""
    if dtype == torch.bfloat16 and DEV.type != "cuda":
        pytest.skip("bf16 tiles run compiled on a GPU only")
    gen = torch.Generator().manual_seed(hn + rot + pos)
    fused = torch.randn(1, b, groups, (per_group + 2) * hn, generator=gen).to(dtype)
    query = fused[..., :per_group * hn].unflatten(-1, (per_group, hn))
    key = fused[..., per_group * hn:(per_group + 1) * hn]
    value = fused[..., (per_group + 1) * hn:]
    angles = torch.rand(max_len, 1, 1, rot // 2, generator=gen).repeat(1, 1, 1, 2) * 10
    cos, sin = rope_tables(angles, dtype)
    keys, values = (torch.randn(b, groups, max_len, hn, generator=gen).to(dtype)
                    for _ in range(2))
    for cached in (keys, values):  # not yet written: never attended to, whatever they hold
        cached[:, :, pos + 1:] = 1e4
    padded = torch.rand(b, 1, 1, max_len, generator=gen) < 0.4
    padded[0, ..., :pad] = True  # left padding spanning whole blocks of 64 keys
    padded[..., pos] = False  # the step's own key is never padding
    bias = torch.zeros(padded.shape, dtype=dtype).masked_fill(padded, float("-inf"))
    blocked = padded | (torch.arange(max_len) > pos)  # the op masks the positions after its own

    at = angles[pos, 0, 0]
    new_keys, new_values = keys.double().clone(), values.double().clone()
    new_keys[:, :, pos] = rotated(key, at, rot)[0]
    new_values[:, :, pos] = value[0].double()
    scores = rotated(query, at, rot)[0] @ new_keys.transpose(-1, -2) / hn ** 0.5
    weights = scores.masked_fill(blocked, float("-inf")).softmax(-1)  # [b, groups, per, max_len]
    expected = (weights @ new_values).reshape(1, b, groups * per_group * hn)

    tables = [t.to(DEV) for t in (cos, sin)]
    cache = [t.to(DEV) for t in (keys, values)]
    got = decode_attention(*(t.to(DEV) for t in (query, key, value)), *tables,
                           torch.tensor([pos], device=DEV), *cache, bias.to(DEV), None, impl=impl,
                           splits=splits)
    cache = [t.cpu() for t in cache]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.cpu().double() - expected).abs().max() < tol
    assert (cache[0][:, :, pos].double() - new_keys[:, :, pos]).abs().max() < tol
    assert torch.equal(cache[1][:, :, pos], value[0])
    others = [p for p in range(max_len) if p != pos]
    assert torch.equal(cache[0][:, :, others], keys[:, :, others])
    assert torch.equal(cache[1][:, :, others], values[:, :, others])


@pytest.mark.parametrize("impl,dtype", [("torch", torch.float32), ("triton", torch.float32),
                                        ("triton", torch.bfloat16)])
@pytest.mark.parametrize("rows,k,f", [(3, 40, 24), (64, 96, 80), (17, 16, 16), (130, 72, 40)])
def test_swiglu_linear_against_float64(impl, dtype, rows, k, f):
    """silu(x W_gate^T) * (x W_up^T) with the gate rows first in the weight: rows, input width
    and F off the kernel's blocks (one block of each, several, partial last ones; more rows than
    a GPU block's 64), leading dims kept; bf16 (GPU only) against float64 on the same bf16-rounded inputs."""
    if dtype == torch.bfloat16 and DEV.type != "cuda":
        pytest.skip("bf16 tiles run compiled on a GPU only")
    gen = torch.Generator().manual_seed(rows + k + f)
    x = torch.randn(1, rows, k, generator=gen).to(dtype)
    weight = (torch.randn(2 * f, k, generator=gen) / k ** 0.5).to(dtype)
    gate, up = (x.double() @ weight.double().t()).chunk(2, dim=-1)
    expected = gate * torch.sigmoid(gate) * up
    got = swiglu_linear(x.to(DEV), weight.to(DEV), impl=impl).cpu()
    assert got.shape == (1, rows, f) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.double() - expected).abs().max() / expected.abs().max() < tol


def test_swiglu_linear_refuses_a_weight_that_does_not_fit():
    with pytest.raises(ValueError, match=r"weight \(5, 8\)"):
        swiglu_linear(torch.zeros(2, 8), torch.zeros(5, 8))
    with pytest.raises(ValueError, match=r"weight \(6, 4\)"):
        swiglu_linear(torch.zeros(2, 8), torch.zeros(6, 4))


@pytest.mark.parametrize("impl,dtype", [("torch", torch.float32), ("triton", torch.float32),
                                        ("triton", torch.bfloat16)])
@pytest.mark.parametrize("rows,k,n,splits", [(3, 40, 24, 1), (64, 200, 80, 2), (17, 320, 16, 5),
                                             (130, 72, 40, 1), (2, 896, 48, None)])
def test_split_k_linear_against_float64(impl, dtype, rows, k, n, splits):
    """Each partial product over its slice of K and their sum (x W^T) against float64: rows, K
    and N off the kernel's blocks (more rows than a GPU block's 64), one slice, a short last
    slice (200 in 2 of 128), slices past K (320 in 5), the device's own count; leading dims
    kept; bf16 (GPU only) against float64 on the same bf16-rounded inputs."""
    if dtype == torch.bfloat16 and DEV.type != "cuda":
        pytest.skip("bf16 tiles run compiled on a GPU only")
    gen = torch.Generator().manual_seed(rows + k + n)
    x = torch.randn(1, rows, k, generator=gen).to(dtype)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    got = split_k_linear(x.to(DEV), weight.to(DEV), splits, impl=impl).cpu()
    parts = splits or got.shape[0]
    assert got.shape == (parts, 1, rows, n) and got.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-4  # bf16 products are exact in float32
    width = slice_width(k, parts)
    for s in range(parts):
        cut = slice(s * width, (s + 1) * width)
        expected = x[..., cut].double() @ weight[:, cut].double().t()
        assert (got[s].double() - expected).abs().max() <= tol * max(expected.abs().max(), 1)
    expected = x.double() @ weight.double().t()
    assert (got.double().sum(0) - expected).abs().max() / expected.abs().max() < tol


def test_split_k_linear_splits_and_refusals():
    """About one program per processor (64 columns each), at least 128 columns of K a slice,
    none empty; a weight that does not fit, or no slice, is refused."""
    assert default_splits(896, 4864, 132) == 8  # Ark-ASR's MLP output: 14 column blocks, 9
    # slices wanted, 8 of 640 columns
    assert default_splits(896, 896, 132) == 7  # its attention output: 7 slices of 128
    assert default_splits(896, 4864, 1) == 1
    assert slice_width(4864, 9) == 640 and slice_width(320, 5) == 128
    with pytest.raises(ValueError, match=r"weight \(6, 4\)"):
        split_k_linear(torch.zeros(2, 8), torch.zeros(6, 4))
    with pytest.raises(ValueError, match="splits must be at least 1"):
        split_k_linear(torch.zeros(2, 8), torch.zeros(6, 8), splits=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name,builder", [("tiny_ark_asr", PromptBuilder.student),
                                          ("tiny_qwen3_asr", PromptBuilder.teacher)])
def test_cuda_graph_decoding_equals_eager_decoding(single_rank, name, builder):
    """The same rollout eagerly, with the graph captured in it, and again replaying that graph
    from its first step; then, with every weight changed in place (as training does), replaying
    it against eager decoding."""
    sp = builder(tokenizer())
    m = model(name, sp, seed=0, scale=3.0, dtype=torch.bfloat16).cuda().eval()
    b = batch(sp)
    feats = [f.cuda().to(torch.bfloat16) for f in b.audio_features]
    prompts = [sp.build(f.shape[-1]).input_ids for f in feats]

    def rollouts(*graphs):
        outs = [generate(m, prompts, feats, sp.stop_id,
                         GenerationConfig(max_new_tokens=8, top_k=4, cuda_graph=graph))
                for graph in graphs]
        assert [out.cuda_graph for out in outs] == list(graphs)
        for out in outs[1:]:
            assert out.tokens == outs[0].tokens
            assert all(torch.equal(a, b) for a, b in zip(out.topk_ids, outs[0].topk_ids))
        return outs[0]

    before = rollouts(False, True, True)
    graph = next(step.graph for step in m.decode_steps.values() if step.graph is not None)
    other = model(name, sp, seed=1, scale=3.0, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        for mine, theirs in zip(m.parameters(), other.parameters()):
            mine.copy_(theirs)
    after = rollouts(False, True)
    assert after.tokens != before.tokens  # the new weights decode otherwise...
    # ...and the graph captured before read them
    assert [step.graph for step in m.decode_steps.values() if step.graph is not None] == [graph]


def test_a_rollout_reuses_the_models_step_of_its_shape(single_rank, monkeypatch):
    """Rollouts of one batch size and cache length share the model's decoding step (on a GPU its
    CUDA graph), started afresh on each prefill: a rollout after a wider one of its shape, whose
    cache then holds anything (NaN here), decodes as on a fresh model. The model keeps its
    KEPT_STEPS most recently used, within KEPT_CACHE_BYTES; `release` drops them."""
    sp = PromptBuilder.student(tokenizer())
    m = model("tiny_ark_asr", sp, seed=0, scale=3.0).to(DEV).eval()

    def rollout(n, start):
        feats = [f.to(DEV) for f in batch(sp, n=n, start=start).audio_features]
        return generate(m, [sp.build(f.shape[-1]).input_ids for f in feats], feats, sp.stop_id,
                        GenerationConfig(max_new_tokens=6, top_k=4))

    fresh = rollout(3, 0)
    DecodeStep.release(m)
    assert not hasattr(m, "decode_steps")
    rollout(3, 3)  # wider prompts, the same cache length
    (step,) = m.decode_steps.values()
    for cached in step.caches:
        for t in cached:
            t.fill_(float("nan"))
    again = rollout(3, 0)
    assert list(m.decode_steps.values()) == [step]
    assert again.tokens == fresh.tokens
    assert all(torch.equal(a, b) for a, b in zip(again.topk_ids, fresh.topk_ids))
    for n in range(1, KEPT_STEPS + 2):
        rollout(n, 0)
    assert [shape[0][0] for shape in m.decode_steps] == list(range(2, KEPT_STEPS + 2))
    monkeypatch.setattr(decode_step, "KEPT_CACHE_BYTES", 0)  # room for the current one only
    rollout(1, 0)
    assert [shape[0][0] for shape in m.decode_steps] == [1]


def test_local_layers_decode_through_the_fused_mlp_and_split_projections(single_rank,
                                                                          monkeypatch):
    """Every decoding step of a local-layer student runs each layer's MLP through
    `swiglu_linear` and its two output projections through `split_k_linear` (a condition that
    never held would leave a kernel unused on a GPU); with `fused_mlp` off, only the attention's
    projection is split; with `split_k_projections` off, neither is."""
    sp = PromptBuilder.student(tokenizer())
    m = model("tiny_ark_asr", sp, seed=0, scale=3.0).to(DEV).eval()
    calls = {"swiglu": [], "split": []}

    def counted(name, kernel):
        def call(*args, **kwargs):
            calls[name].append(args[1].shape)
            return kernel(*args, **kwargs)
        return call

    monkeypatch.setattr(decode_step, "swiglu_linear", counted("swiglu", swiglu_linear))
    monkeypatch.setattr(decode_step, "split_k_linear", counted("split", split_k_linear))
    feats = [f.to(DEV) for f in batch(sp, n=2).audio_features]

    def rollout(kernels):
        for made in calls.values():
            made.clear()
        # eager steps: a replayed CUDA graph would call no Python
        out = generate(m, [sp.build(f.shape[-1]).input_ids for f in feats], feats, sp.stop_id,
                       GenerationConfig(max_new_tokens=4, top_k=4, cuda_graph=False),
                       kernels=kernels)
        assert out.steps == 4
        return {name: made[:2] + [len(made)] for name, made in calls.items()}

    layer, n = m.gpt.decoder.layers[0], len(m.gpt.decoder.layers) * 3  # 3 steps after the prefill
    fc1, fc2 = layer.mlp.linear_fc1.weight.shape, layer.mlp.linear_fc2.weight.shape
    proj = layer.self_attention.linear_proj.weight.shape
    assert rollout(DecodeKernels()) == {"swiglu": [fc1, fc1, n], "split": [proj, fc2, 2 * n]}
    assert rollout(DecodeKernels(fused_mlp=False)) == {"swiglu": [0], "split": [proj, proj, n]}
    assert rollout(DecodeKernels(split_k_projections=False)) == {"swiglu": [fc1, fc1, n],
                                                                 "split": [0]}


def test_every_choice_of_decoding_kernels_decodes_the_same_rollout(single_rank, monkeypatch):
    """The attention over the cache in one part and in three merged ones, the MLP fused and as
    its own modules, the output projections in two slices summed by the add after them and as
    the layers' own, the pick in one selection and in chunks (`tools/bench_decode.py` times
    each): the same tokens and top-k ids; each choice of the step's with a step of its own (the
    pick runs after it). In a model on the CPU the attention runs the reference whatever its
    splits (the kernel's are checked above), so there this checks that the choice reaches it."""
    sp = PromptBuilder.student(tokenizer())
    m = model("tiny_ark_asr", sp, seed=0, scale=3.0).to(DEV).eval()
    splits = []
    monkeypatch.setattr(decode_step, "decode_attention", lambda *a, **k: splits.append(
        k["splits"]) or decode_attention(*a, **k))
    def in_two_slices(x, w, **kwargs):  # the tiny model's widths fit one slice of 128
        pad = x.shape[-1] % 128 and 128 - x.shape[-1] % 128
        x = torch.cat([F.pad(x, (0, pad)), x], -1)  # each slice: x (W / 2)^T
        return split_k_linear(x, torch.cat([F.pad(w, (0, pad)), w], -1) / 2, splits=2, **kwargs)

    monkeypatch.setattr(decode_step, "split_k_linear", in_two_slices)
    feats = [f.to(DEV) for f in batch(sp, n=3).audio_features]
    choices = [DecodeKernels(attention_splits=1), DecodeKernels(attention_splits=3),
               DecodeKernels(fused_mlp=False), DecodeKernels(split_k_projections=False),
               DecodeKernels(pick_chunk=32)]
    outs = [generate(m, [sp.build(f.shape[-1]).input_ids for f in feats], feats, sp.stop_id,
                     GenerationConfig(max_new_tokens=6, top_k=4), kernels=kernels)
            for kernels in choices]
    assert all(out.steps == 6 for out in outs)  # steps of the decoding step were compared
    for out in outs[1:]:
        assert out.tokens == outs[0].tokens
        assert all(torch.equal(a, b) for a, b in zip(out.topk_ids, outs[0].topk_ids))
    assert set(splits) == {1, 3, None}
    made = choices[:4] + [DecodeKernels()]  # the model keeps the last KEPT_STEPS
    assert [key[-1] for key in m.decode_steps] == made[-KEPT_STEPS:]


def test_decode_attention_refuses_tables_or_bias_that_do_not_fit_the_cache():
    query, kv = torch.zeros(1, 2, 1, 2, 8), torch.zeros(1, 2, 1, 8)
    cache = [torch.zeros(2, 1, 16, 8) for _ in range(2)]
    tables, bias = torch.zeros(16, 8), torch.zeros(2, 1, 1, 16)
    position = torch.tensor([3])
    with pytest.raises(ValueError, match="16 positions"):  # RoPE tables of 10 positions
        decode_attention(query, kv, kv, tables[:10], tables[:10], position, *cache, bias, None)
    with pytest.raises(ValueError, match="16 positions"):  # a bias of another width
        decode_attention(query, kv, kv, tables, tables, position, *cache, bias[..., :12], None)
    with pytest.raises(ValueError, match="splits must be at least 1"):
        decode_attention(query, kv, kv, tables, tables, position, *cache, bias, None, splits=0)
    decode_attention(query, kv, kv, tables, tables, position, *cache, bias, None)
