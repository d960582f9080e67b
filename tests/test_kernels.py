"""The fused OPD kernels against float64 references on fresh random inputs (on CPU the Triton
kernels run in Triton's interpreter)."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

from ark_mega.kernels import sparse_lm_head, teacher_topk, union_kl, union_support
from ark_mega.kernels.add_rms_norm import add_rms_norm
from ark_mega.kernels.rope import packed_rope, rope_tables, tables_at
from ark_mega.kernels.sparse_lm_head import sparse_logits_reference
from ark_mega.kernels.teacher_topk import teacher_topk_reference, vocab_topk
from ark_mega.kernels.union_kl import union_kl_reference

V = 300
# The kernels run compiled on a GPU, in Triton's interpreter on the CPU; inputs are made on the
# CPU (same values on both) and moved to the kernels' device, results compared on the CPU.
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_dev(*tensors):
    return [t.to(DEV) for t in tensors]


def on_cpu(result):
    return type(result)(*(t.cpu() for t in result))


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def topk_pair(n, k, seed, overlap=0.5):
    """Unique teacher and student top-k ids per row, sharing about `overlap` of them."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.rand(n, V, generator=gen).topk(k, dim=-1).indices
    scores = torch.rand(n, V, generator=gen)
    shared = torch.rand(n, k, generator=gen) < overlap
    scores.scatter_(1, teacher, torch.where(shared, 2.0, 0.0))
    student = scores.topk(k, dim=-1).indices
    return teacher, student


@pytest.mark.parametrize("k", [1, 32, 64])
def test_union_support_matches_sets(k):
    n = 21
    teacher, student = topk_pair(n, k, seed=k)
    teacher[3] = -1  # an all-invalid row
    student[3] = -1
    teacher[5, : k // 2 + 1] = -1  # unmappable teacher ids
    gen = torch.Generator().manual_seed(k + 1)
    t_scores, s_scores = torch.randn(n, k, generator=gen), torch.randn(n, k, generator=gen)
    got = on_cpu(union_support(*on_dev(teacher, student, t_scores, s_scores), impl="triton"))
    ref = union_support(teacher, student, t_scores, s_scores, impl="torch")
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    for row in range(n):
        ids = got.ids[row][got.valid[row]].tolist()
        expected = {i for i in teacher[row].tolist() + student[row].tolist() if i >= 0}
        assert len(ids) == len(set(ids)) and set(ids) == expected
        score_of = dict(zip(teacher[row].tolist(), t_scores[row].tolist()))
        score_of.update({i: s for i, s in zip(student[row].tolist(), s_scores[row].tolist())
                         if i not in score_of})
        for i, s in zip(got.ids[row].tolist(), got.teacher_scores[row].tolist()):
            assert s == (score_of[i] if i >= 0 else 0.0)
    assert got.vuss.item() == pytest.approx(got.valid.sum().item() / n)
    assert got.valid[3].sum() == 0


def kl_inputs(n, u, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, u, generator=gen) * 3).to(dtype)
    t = (torch.randn(n, u, generator=gen) * 3).log_softmax(-1).to(dtype)
    valid = torch.rand(n, u, generator=gen) < 0.7
    valid[0] = False  # no valid entry
    valid[1] = False
    valid[1, 0] = True  # one valid entry: not counted
    return s, t, valid


@pytest.mark.parametrize("u", [2, 64, 128])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_union_kl_kernel_against_float64(u, tau, reduction):
    s, t, valid = kl_inputs(33, u, seed=u)
    s_k = s.clone().to(DEV).requires_grad_()
    loss = union_kl(s_k, *on_dev(t, valid), tau, impl="triton", reduction=reduction)
    loss.backward()
    loss, grad = loss.cpu(), s_k.grad.cpu()
    s64 = s.double().requires_grad_()
    ref = union_kl_reference(s64, t.double(), valid, tau, reduction)
    ref.backward()
    assert rel(loss, ref) < 1e-5
    assert rel(grad, s64.grad) < 1e-5
    assert torch.all(grad[~valid] == 0) and torch.all(grad[:2] == 0)


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1)])
@pytest.mark.parametrize("u", [2, 64])
def test_divergence_kernels_against_float64(divergence, beta, u):
    s, t, valid = kl_inputs(33, u, seed=u + 1)
    s_k = s.clone().to(DEV).requires_grad_()
    loss = union_kl(s_k, *on_dev(t, valid), 2.0, impl="triton", divergence=divergence, beta=beta)
    loss.backward()
    s64 = s.double().requires_grad_()
    ref = union_kl_reference(s64, t.double(), valid, 2.0, divergence=divergence, beta=beta)
    ref.backward()
    assert rel(loss.cpu(), ref) < 1e-5 and rel(s_k.grad.cpu(), s64.grad) < 1e-5
    assert torch.all(s_k.grad.cpu()[~valid] == 0)


def test_divergence_references_are_their_definitions():
    """Row by row from the definitions (softmaxes over the valid entries only), and gradchecked."""
    s, t, valid = kl_inputs(7, 6, seed=5, dtype=torch.float64)
    tau, beta = 2.0, 0.3
    kl = lambda a, b: (a * (a.log() - b.log())).sum()  # noqa: E731
    want = {"reverse_kl": [], "jsd": []}
    for i in range(7):
        if valid[i].sum() < 2:
            continue
        p = torch.softmax(t[i][valid[i]] / tau, 0)
        q = torch.softmax(s[i][valid[i]] / tau, 0)
        m = beta * p + (1 - beta) * q
        want["reverse_kl"].append(tau ** 2 * kl(q, p))
        want["jsd"].append(tau ** 2 * (beta * kl(p, m) + (1 - beta) * kl(q, m)))
    for divergence, rows in want.items():
        got = union_kl_reference(s, t, valid, tau, divergence=divergence, beta=beta)
        assert got.item() == pytest.approx(sum(rows).item() / len(rows), rel=1e-12)
        assert torch.autograd.gradcheck(
            lambda x: union_kl_reference(x, t, valid, tau, divergence=divergence, beta=beta),
            (s.clone().requires_grad_(),))
    with pytest.raises(ValueError, match="divergence must be one of"):
        union_kl(s, t, valid, divergence="kl")
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\)"):
        union_kl(s, t, valid, divergence="jsd", beta=1.0)


def test_union_kl_reference_is_the_paper_equation():
    s, t, valid = kl_inputs(7, 6, seed=3, dtype=torch.float64)
    tau, total, rows = 2.0, 0.0, 0
    for i in range(7):
        m = valid[i]
        if m.sum() < 2:
            continue
        p = torch.softmax(t[i][m] / tau, 0)
        q = torch.softmax(s[i][m] / tau, 0)
        total += tau ** 2 * (p * (p.log() - q.log())).sum()
        rows += 1
    assert union_kl_reference(s, t, valid, tau).item() == pytest.approx(total.item() / rows, rel=1e-12)
    assert union_kl_reference(s, t, valid, tau, "sum").item() == pytest.approx(total.item(), rel=1e-12)


def test_union_kl_reference_gradcheck():
    s, t, valid = kl_inputs(5, 6, seed=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: union_kl_reference(x, t, valid, 2.0),
                                    (s.requires_grad_(),))


# a hidden width over 1,024 takes the gradient kernels' loops over blocks of H
@pytest.mark.parametrize("u, h", [(2, 40), (64, 40), (128, 40), (64, 1040)])
def test_sparse_lm_head_against_float64(u, h):
    n = 19
    gen = torch.Generator().manual_seed(u)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(V, h, generator=gen)
    ids = torch.randint(0, V, (n, u), generator=gen)
    ids[torch.rand(n, u, generator=gen) < 0.2] = -1
    ids[2] = -1
    hk, wk = hidden.clone().to(DEV).requires_grad_(), weight.clone().to(DEV).requires_grad_()
    g = torch.randn(n, u, generator=gen)
    out = sparse_lm_head(hk, wk, ids.to(DEV), impl="triton")
    (out * g.to(DEV)).sum().backward()
    out, h_grad, w_grad = out.detach().cpu(), hk.grad.cpu(), wk.grad.cpu()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = sparse_logits_reference(h64, w64, ids)
    (ref * g.double()).sum().backward()
    assert rel(out, ref) < 1e-5
    assert torch.all(out[ids < 0] == 0)
    assert rel(h_grad, h64.grad) < 1e-5 and rel(w_grad, w64.grad) < 1e-5


def test_sparse_lm_head_forms_only_the_gradients_asked_for(monkeypatch):
    """A frozen output layer gets no weight gradient, and frozen hidden states no hidden one:
    the other gradient is the one formed with both, and the skipped kernel never runs."""
    module = importlib.import_module("ark_mega.kernels.sparse_lm_head")
    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(6, 40, generator=gen), torch.randn(V, 40, generator=gen)
    ids = torch.randint(0, V, (6, 8), generator=gen)
    g = torch.randn(6, 8, generator=gen)

    def grads(train_hidden, train_weight):
        h, w = (t.clone().to(DEV).requires_grad_(train)
                for t, train in ((hidden, train_hidden), (weight, train_weight)))
        (sparse_lm_head(h, w, ids.to(DEV), impl="triton") * g.to(DEV)).sum().backward()
        return h.grad, w.grad

    both = grads(True, True)

    class NeverLaunched:
        def __getitem__(self, grid):
            raise AssertionError("a gradient nobody asked for was formed")

    with monkeypatch.context() as patch:
        patch.setattr(module, "_weight_grad", NeverLaunched().__getitem__)
        h_grad, w_grad = grads(True, False)
    assert w_grad is None and torch.equal(h_grad, both[0])
    with monkeypatch.context() as patch:
        patch.setattr(module, "_grad_hidden_kernel", NeverLaunched())
        h_grad, w_grad = grads(False, True)
    assert h_grad is None and torch.equal(w_grad, both[1])


def test_sparse_lm_head_shard_owns_its_rows_only():
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(4, 8, generator=gen), torch.randn(V, 8, generator=gen)
    ids = torch.randint(0, V, (4, 16), generator=gen)
    hidden, weight, ids = on_dev(hidden, weight, ids)
    full = sparse_lm_head(hidden, weight, ids, impl="triton")
    halves = [sparse_lm_head(hidden, weight[a:a + V // 2], ids, vocab_start=a, impl="triton")
              for a in (0, V // 2)]
    assert torch.allclose(halves[0] + halves[1], full, atol=1e-6)
    assert torch.all(halves[0][ids >= V // 2] == 0)


@pytest.mark.parametrize("piece, columns", [(256, 3), (16, 3), (16, 8)])
def test_sparse_lm_head_weight_gradient_segments(piece, columns, monkeypatch):
    """A long segment of one id (in `columns` of every row): summed by one program (many
    blocks of its loop), or split into pieces of `piece` entries, summed apart and then
    together, up to every entry but one in it (the most pieces there can be); a shard whose
    unowned entries sort last; bitwise-equal gradients from two runs (no atomics)."""
    # the module (the package exports the function under the module's name)
    monkeypatch.setattr(importlib.import_module("ark_mega.kernels.sparse_lm_head"),
                        "SEGMENT_PIECE", piece)
    gen = torch.Generator().manual_seed(3)
    n, u, h = 40, 8, 24
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(V, h, generator=gen)
    ids = torch.randint(0, V, (n, u), generator=gen)
    ids[:, :columns] = 7  # one id in 40 * columns entries
    ids[5, 5] = -1
    g = torch.randn(n, u, generator=gen)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (sparse_logits_reference(h64, w64, ids) * g.double()).sum().backward()
    half = V // 2
    for start, rows in ((0, slice(0, half)), (half, slice(half, V))):
        runs = []
        for _ in range(2):
            hk, wk = hidden.to(DEV).requires_grad_(), weight[rows].to(DEV).requires_grad_()
            (sparse_lm_head(hk, wk, ids.to(DEV), vocab_start=start, impl="triton")
             * g.to(DEV)).sum().backward()
            runs.append(wk.grad.cpu())
        assert torch.equal(runs[0], runs[1])
        assert rel(runs[0], w64.grad[rows]) < 1e-5


def test_sparse_lm_head_never_waits_for_the_device(host_reads, monkeypatch):
    """Forward and backward, with a segment split into pieces, read nothing on the host: each
    read waits for the GPU, and the launches after it leave the GPU idle (run 7's backward
    read twice)."""
    gen = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(40, 24, generator=gen), torch.randn(V, 24, generator=gen)
    ids = torch.randint(0, V, (40, 16), generator=gen)
    ids[:, :2] = 7  # 80 entries of one id, split into pieces of 16
    monkeypatch.setattr(importlib.import_module("ark_mega.kernels.sparse_lm_head"),
                        "SEGMENT_PIECE", 16)
    hk, wk = (t.to(DEV).requires_grad_() for t in (hidden, weight))
    host_reads.clear()
    sparse_lm_head(hk, wk, ids.to(DEV), impl="triton").sum().backward()
    assert host_reads == []


def test_sparse_lm_head_reference_gradcheck():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 4, -1], [8, 8, 2], [-1, -1, -1]])
    assert torch.autograd.gradcheck(lambda h, w: sparse_logits_reference(h, w, ids), (hidden, weight))


@pytest.mark.parametrize("k", [1, 32, 64])
def test_teacher_topk_from_logits_and_hidden(k):
    n, h = 9, 16
    gen = torch.Generator().manual_seed(k)
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(V, h, generator=gen)
    logits = hidden @ weight.t()
    student = torch.randint(0, V, (n, k), generator=gen)
    student[0, 0], student[1, -1] = -1, V + 5  # outside the vocabulary
    ref = teacher_topk_reference(logits.double(), k, student)
    student_d, logits_d, hidden_d, weight_d = on_dev(student, logits, hidden, weight)
    for got in (teacher_topk(k, student_d, logits=logits_d, impl="triton"),
                teacher_topk(k, student_d, hidden=hidden_d, weight=weight_d, chunk=64, impl="triton")):
        got = on_cpu(got)
        assert torch.equal(got.ids, ref.ids)
        assert rel(got.logprobs, ref.logprobs) < 1e-5
        finite = torch.isfinite(ref.logprobs_at_student)
        assert torch.equal(finite, torch.isfinite(got.logprobs_at_student))
        assert rel(got.logprobs_at_student[finite], ref.logprobs_at_student[finite]) < 1e-5
        assert torch.isinf(got.logprobs_at_student[0, 0]) and torch.isinf(got.logprobs_at_student[1, -1])


def test_teacher_topk_with_blocked_leading_block_and_chunk():
    """Blocked ids (-inf) filling the kernel's first block of a row, or a whole chunk of the
    vocabulary, give the reference's finite log-probabilities, not NaN."""
    n, h, v = 4, 8, 1500  # the kernel reads a row 1024 ids at a time
    gen = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen)
    blocked = torch.zeros(v, dtype=torch.bool)
    blocked[:1100] = True
    student = torch.randint(1100, v, (n, 4), generator=gen)
    ref = teacher_topk_reference((hidden @ weight.t()).double().masked_fill(blocked, float("-inf")),
                                 4, student)
    student, hidden, weight, blocked = on_dev(student, hidden, weight, blocked)
    for got in (teacher_topk(4, student, logits=hidden @ weight.t(), blocked=blocked, impl="triton"),
                teacher_topk(4, student, hidden=hidden, weight=weight, blocked=blocked, chunk=512,
                             impl="triton")):
        got = on_cpu(got)
        assert torch.isfinite(got.logprobs).all() and torch.isfinite(got.logprobs_at_student).all()
        assert torch.equal(got.ids, ref.ids)
        assert rel(got.logprobs_at_student, ref.logprobs_at_student) < 1e-5


@pytest.mark.parametrize("v,chunk", [(1500, 100), (1500, 64), (1499, 64), (1473, 64),
                                     (40, 1000)])
def test_vocab_topk_in_chunks_equals_one_selection(v, chunk):
    """The top k of each chunk, then of those: the same ids in the same order as one selection
    over the row, with blocked ids and the shard's offset; chunks that divide the row (100, or
    60 for 64), the last one padded (1,499 ids is prime; of 1,473, one id), one chunk larger
    than the row. A row with fewer than k unblocked ids still gets ids of the row only."""
    gen = torch.Generator().manual_seed(v + chunk)
    logits = torch.randn(5, v, generator=gen)
    blocked = torch.rand(v, generator=gen) < 0.3
    whole = vocab_topk(8, logits, 1000, blocked=blocked)
    assert torch.equal(vocab_topk(8, logits, 1000, blocked=blocked, chunk=chunk), whole)
    assert not blocked[whole - 1000].any()
    blocked[:3], blocked[3:] = False, True
    few = vocab_topk(8, logits, 1000, blocked=blocked, chunk=chunk)
    assert torch.equal(few[:, :3], vocab_topk(3, logits, 1000, blocked=blocked))
    assert ((few >= 1000) & (few < 1000 + v)).all()


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("width, eps", [(896, 1e-6), (64, None)])
@pytest.mark.parametrize("parts", [None, 1, 3])
def test_add_rms_norm_against_float64(width, eps, parts, impl):
    """The residual sum and its RMSNorm (eps None: the dtype's epsilon, as torch's), on rows
    whose scales differ by 10^4 (each row is normalised by its own mean square); the added
    output whole, or as float32 partial sums (`split_k_linear`'s)."""
    gen = torch.Generator().manual_seed(width)
    scale = torch.logspace(-2, 2, 5)[:, None]
    hidden = torch.randn(3, 5, width, generator=gen) * scale
    delta = torch.randn(parts or 1, 3, 5, width, generator=gen) * scale
    weight = torch.randn(width, generator=gen)
    total, normed = add_rms_norm(*on_dev(hidden, delta if parts else delta[0], weight), eps,
                                 impl=impl)
    x = hidden.double() + delta.double().sum(0)
    mean_square = x.pow(2).mean(-1, keepdim=True)
    ref = x / (mean_square + (torch.finfo(torch.float32).eps if eps is None else eps)).sqrt()
    assert rel(total.cpu(), x) < 1e-6
    assert rel(normed.cpu(), ref * weight.double()) < 1e-5


@pytest.mark.skipif(DEV.type != "cuda", reason="bf16 runs compiled on a GPU only")
def test_add_rms_norm_rounds_as_torch_in_bf16():
    gen = torch.Generator().manual_seed(0)
    hidden, delta, weight = on_dev(*(torch.randn(*shape, generator=gen).to(torch.bfloat16)
                                     for shape in ((64, 896), (64, 896), (896,))))
    got = add_rms_norm(hidden, delta, weight, 1e-6, impl="triton")
    ref = add_rms_norm(hidden, delta, weight, 1e-6, impl="torch")
    assert torch.equal(got[0], ref[0])
    assert rel(got[1].float(), ref[1].float()) < 1e-2
    # partial sums: summed in order in float32, rounded to bf16 as the projection's output
    parts = on_dev(torch.randn(3, 64, 896, generator=gen))[0]
    got = add_rms_norm(hidden, parts, weight, 1e-6, impl="triton")
    ref = add_rms_norm(hidden, (parts[0] + parts[1] + parts[2]).to(torch.bfloat16), weight,
                       1e-6, impl="torch")
    assert torch.equal(got[0], ref[0])
    assert rel(got[1].float(), ref[1].float()) < 1e-2


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("hn,rot", [(12, 12), (12, 8), (16, 6)])
def test_packed_rope_against_float64(hn, rot, impl):
    """Packed segments rotated at each token's position within its segment, forward and
    backward; q and k are strided views of one fused projection, as megatron's."""
    gen = torch.Generator().manual_seed(hn * rot)
    boundaries, groups, per_group = (0, 5, 6, 41, 77), 2, 3  # 77 tokens: a partial last block
    t = boundaries[-1]
    fused = torch.randn(t, groups, (per_group + 2) * hn, generator=gen)
    query = fused[..., :per_group * hn].reshape(t, groups * per_group, hn)
    key = fused[..., per_group * hn:(per_group + 1) * hn]
    freqs = torch.rand(40, 1, 1, rot // 2, generator=gen).repeat(1, 1, 1, 2) * 10
    cos, sin = tables_at(*rope_tables(freqs, torch.float32), boundaries)
    pos = torch.cat([torch.arange(b - a) for a, b in zip(boundaries, boundaries[1:])])
    angle = freqs[pos, 0, :, :rot // 2].double()  # [t, 1, rot / 2]

    def rotated(x):  # float64, from the definition: x * cos + rotate_half(x) * sin
        x1, x2, rest = x[..., :rot // 2], x[..., rot // 2:rot], x[..., rot:]
        return torch.cat((x1 * angle.cos() - x2 * angle.sin(),
                          x2 * angle.cos() + x1 * angle.sin(), rest), -1)

    for x in (query, key):
        x64 = x.double().requires_grad_()
        dy = torch.randn(x.shape, generator=gen)
        (ref_grad,) = torch.autograd.grad((rotated(x64) * dy.double()).sum(), x64)
        x_dev, dy_dev = on_dev(x.clone().requires_grad_(), dy)
        x_dev.retain_grad()
        got = packed_rope(x_dev, *on_dev(cos, sin), impl=impl)
        got.backward(dy_dev)
        assert rel(got.detach().cpu(), rotated(x.double())) < 1e-6
        assert rel(x_dev.grad.cpu(), ref_grad) < 1e-6


def test_packed_rope_rejects_tables_that_do_not_fit():
    x = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="do not fit"):
        packed_rope(x, torch.ones(3, 8), torch.ones(3, 8))
    with pytest.raises(ValueError, match="do not fit"):
        packed_rope(x, torch.ones(4, 10), torch.ones(4, 10))


def test_vocab_parallel_kernels_at_tp2_equal_tp1():
    from conftest import torchrun

    (record,) = torchrun("dist_kernels.py")
    assert set(record["max_abs_diff"]) == {"sparse_lm_head", "linear_cross_entropy", "vocab_topk",
                                           "teacher_topk_logits", "teacher_topk_hidden"}
    assert record["passed"], record


def test_first_steps_neither_recompile_nor_retune_a_kernel():
    """Row and token counts are not specialised on: a new count divisible by 16 (or not) would
    compile the kernel again inside a training step or a rollout. Autotuning results are kept
    on disk for the next process. Read from the compiled (not interpreted) kernels, which only
    a process without TRITON_INTERPRET builds."""
    script = """
from importlib import import_module
from ark_mega.kernels._backend import _TUNED
assert _TUNED and all(kernel.cache_results for kernel in _TUNED), _TUNED
for module, kernel, name in (("rope", "_rope_kernel", "n"),
                             ("teacher_topk", "_lse_gather_kernel", "chunk_start"),
                             ("union_kl", "_union_kl_kernel", "n_rows"),
                             ("union_support", "_union_kernel", "n_rows"),
                             ("add_rms_norm", "_add_rms_norm_kernel", "rows"),
                             ("swiglu_linear", "_swiglu_linear_kernel", "rows"),
                             ("split_k_linear", "_split_k_linear_kernel", "rows")):
    jitted = getattr(import_module("ark_mega.kernels." + module), kernel)
    jitted = jitted if hasattr(jitted, "params") else jitted.fn  # under an autotuner
    params = {p.name: p for p in jitted.params}
    assert params[name].do_not_specialize, (kernel, name)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_ops_name_the_inputs_that_do_not_fit():
    """A kernel reads what its pointers give it: shapes are checked before any launch."""
    ids = torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"teacher scores at the student ids \(4, 2\)"):
        union_support(ids, ids, torch.zeros(4, 3), torch.zeros(4, 2), impl="triton")
    with pytest.raises(ValueError, match=r"valid mask \(4,\)"):
        union_kl(torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="must share one"):  # not [N, U]
        union_kl(*(torch.zeros(4) for _ in range(2)), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="need the output layer's weight"):
        teacher_topk(2, ids, hidden=torch.zeros(4, 8))
    with pytest.raises(ValueError, match="norm weight"):
        add_rms_norm(torch.zeros(2, 8), torch.zeros(2, 8), torch.ones(6), 1e-6)
    with pytest.raises(ValueError, match=r"delta \(3, 2, 6\)"):  # partial sums of another width
        add_rms_norm(torch.zeros(2, 8), torch.zeros(3, 2, 6), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match=r"delta \(3, 2, 8\) torch.bfloat16"):  # not float32
        add_rms_norm(torch.zeros(2, 8), torch.zeros(3, 2, 8, dtype=torch.bfloat16), torch.ones(8),
                     1e-6)
