"""OPD at TP = PP = 1: generation, the loss against full logits, cross-tokenizer mapping."""

import dataclasses

import pytest
import torch

from ark_mega.data import PromptBuilder
from ark_mega.config import GenerationConfig
from ark_mega.kernels import UnionSupport
from ark_mega.opd.generate import generate
from ark_mega.opd.scoring import packed
from ark_mega.opd.token_map import TokenMap, align_by_characters, byte_spans
from opd_setup import batch, model, opd_step, stop_at_once, tokenizer


@pytest.mark.parametrize("name,builder", [("tiny_ark_asr", PromptBuilder.student),
                                          ("tiny_qwen3_asr", PromptBuilder.teacher)])
def test_kv_cache_generation_equals_full_recomputation(single_rank, name, builder):
    """Both families (Qwen2 decoder with QKV bias; Qwen3 with q/k norms and a head width that is
    not hidden / heads) decode with the cache as with the whole sequence recomputed."""
    sp = builder(tokenizer())
    student = model(name, sp, seed=0, scale=3.0).eval()
    with torch.no_grad():  # megatron initialises biases to zero: the QKV bias must count here
        for param_name, param in student.named_parameters():
            if param_name.endswith("linear_qkv.bias"):
                param.normal_()
    b = batch(sp)
    prompts = [sp.build(f.shape[-1]).input_ids for f in b.audio_features]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    out = generate(student, prompts, b.audio_features, sp.stop_id,
                   GenerationConfig(max_new_tokens=6, top_k=4))
    for prompt, feats, tokens, topk in zip(prompts, b.audio_features, out.tokens, out.topk_ids):
        seq, ref = list(prompt), []
        for step in range(6):
            with torch.no_grad():
                logits = student(torch.tensor([seq]), [feats])[-1, 0]
            assert torch.equal(topk[step], logits.topk(4).indices)
            nxt = int(logits.argmax())
            if nxt == sp.stop_id:
                break
            ref.append(nxt)
            seq.append(nxt)
        assert tokens == ref
    assert len({tuple(t) for t in out.tokens}) > 1


def test_reading_tokens_every_few_steps_changes_no_rollout(single_rank):
    """As on a GPU: rows that stop between two reads decode padding until the next one; the
    rollout (tokens, stops, top-k ids) is the one read at every step."""
    sp = PromptBuilder.student(tokenizer())
    student = model("tiny_ark_asr", sp, seed=0, scale=3.0).eval()
    b = batch(sp, n=4)
    prompts = [sp.build(f.shape[-1]).input_ids for f in b.audio_features]
    def run(stop_id, every):
        return generate(student, prompts, b.audio_features, stop_id,
                        GenerationConfig(max_new_tokens=12, top_k=4, check_every=every))

    # random weights never pick the real stop token: stop at a token row 0 picks third
    stop_id = run(-1, 1).tokens[0][2]
    runs = [run(stop_id, every) for every in (1, 5)]
    assert any(runs[0].stopped) and len({len(t) for t in runs[0].tokens}) > 1
    assert runs[0].tokens == runs[1].tokens and runs[0].stopped == runs[1].stopped
    assert all(torch.equal(x, y) for x, y in zip(runs[0].topk_ids, runs[1].topk_ids))
    assert runs[1].steps % 5 == 0 or runs[1].steps == 12


def test_sampling_draws_multinomials_sample_within_top_k_and_top_p(single_rank):
    """Temperature / top-p sampling over the top-k: torch.multinomial's draw from the same
    generator (the draw is written out so that a GPU step waits for nothing on the host), only
    ids inside the nucleus, and the same draws from the same seed."""
    from ark_mega.opd.generate import _pick

    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    cfg = GenerationConfig(top_k=8, greedy=False, temperature=0.7, top_p=0.8)
    ids, top = _pick(logits, None, cfg, torch.Generator().manual_seed(5))
    probs = torch.softmax(logits.topk(8).values.log_softmax(-1) / 0.7, dim=-1)
    nucleus = probs.cumsum(-1) - probs < 0.8
    expected = torch.multinomial(probs.masked_fill(~nucleus, 0.0), 1,
                                 generator=torch.Generator().manual_seed(5))
    assert torch.equal(top, logits.topk(8).indices)
    assert torch.equal(ids, top.gather(1, expected)[:, 0])
    assert (nucleus.sum(-1) < 8).any() and len(set(ids.tolist())) > 1
    assert torch.equal(_pick(logits, None, cfg, torch.Generator().manual_seed(5))[0], ids)


def test_sampled_rollouts_draw_anew_in_each_step_and_micro_batch(single_rank):
    """Each OPD rollout's draws come from its own seed (step, micro-batch, data-parallel rank):
    the same step's rollout again is the same, another step's or micro-batch's differs."""
    sp = PromptBuilder.student(tokenizer())
    student = model("tiny_ark_asr", sp, seed=0, scale=3.0)
    step, sp, _ = opd_step(student)
    assert step.generation(3, 1) is step.cfg.generation  # greedy: nothing to draw
    step.cfg.generation = dataclasses.replace(step.cfg.generation, greedy=False, temperature=2.0)
    b = batch(sp, n=4)

    def answers(at, micro):
        return step.prepare(b, step.generation(at, micro))[0]["answers"]

    first = answers(0, 0)
    assert answers(0, 0) == first
    assert answers(1, 0) != first and answers(0, 1) != first
    assert len({step.generation(s, m).seed for s in range(3) for m in range(3)}) == 9


def test_prefill_forms_logits_at_the_last_position_only(single_rank):
    """The rollout's prefill runs the output layer on [1, b, h], not on every prompt position
    (at 64 utterances of 30 s that would be [~830, 64, V]: 8.2 GiB at Qwen's vocabulary)."""
    sp = PromptBuilder.student(tokenizer())
    student = model("tiny_ark_asr", sp, seed=0, scale=3.0).eval()
    b = batch(sp)
    prompts = [sp.build(f.shape[-1]).input_ids for f in b.audio_features]
    shapes, logits = [], student.logits
    student.logits = lambda hidden: shapes.append(tuple(hidden.shape)) or logits(hidden)
    generate(student, prompts, b.audio_features, sp.stop_id,
             GenerationConfig(max_new_tokens=3, top_k=4))
    width = max(len(p) for p in prompts)
    assert width > 1 and shapes  # a real prefill, then decoding steps
    assert all(shape[:2] == (1, len(prompts)) for shape in shapes), shapes


@pytest.mark.parametrize("tau,divergence,beta", [(1.0, "forward_kl", 0), (2.0, "forward_kl", 0),
                                                 (1.0, "reverse_kl", 0), (2.0, "jsd", 0.3)])
def test_opd_loss_equals_direct_computation_from_full_logits(single_rank, tau, divergence, beta):
    sp = PromptBuilder.student(tokenizer())
    student = model("tiny_ark_asr", sp, seed=0, scale=3.0)
    step, sp, teacher = opd_step(student, temperature=tau, divergence=divergence, beta=beta or 0.5)
    b = batch(sp)
    work, _ = step.prepare(b, step.generation(0, 0))
    micro, flat, union = work["micro"], work["flat"], work["union"]
    assert union.valid.sum(1).max() > 8  # teacher and student disagree somewhere
    metrics = step([b])
    fused_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    full = student(micro["input_ids"], micro["audio_features"], micro["cu_seqlens"])[flat, 0]
    # the paper's Eq. 1 in float64, position by position: tau^2 * KL(p_T || p_S) over the union
    # ids (or the other divergences), both renormalised at temperature tau, averaged over
    # positions with >= 2 union ids
    kl = lambda a, b: (a * (a.log() - b.log())).sum()  # noqa: E731
    terms = []
    for row in range(full.shape[0]):
        ids = union.ids[row][union.valid[row]]
        if len(ids) < 2:
            continue
        log_p = torch.log_softmax(union.teacher_scores[row][union.valid[row]].double() / tau, 0)
        log_q = torch.log_softmax(full[row, ids].double() / tau, 0)
        p, q = log_p.exp(), log_q.exp()
        m = beta * p + (1 - beta) * q
        terms.append(tau ** 2 * {"forward_kl": kl(p, q), "reverse_kl": kl(q, p),
                                 "jsd": beta * kl(p, m) + (1 - beta) * kl(q, m)}[divergence])
    direct = torch.stack(terms).mean()
    assert metrics["loss"] == pytest.approx(direct.item(), rel=1e-5)
    direct.backward()  # and its gradients, through the whole student
    assert fused_grads
    for name, grad in fused_grads.items():
        ref = dict(student.named_parameters())[name].grad
        assert (grad - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-9, name
    assert metrics["positions"] == int((union.valid.sum(1) >= 2).sum())
    assert metrics["vuss"] == pytest.approx(union.valid.sum(1).float().mean().item())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_scores_are_the_teachers_log_probabilities(single_rank):
    sp = PromptBuilder.student(tokenizer())
    student = model("tiny_ark_asr", sp, seed=0, scale=3.0)
    step, sp, teacher = opd_step(student)
    b = batch(sp, n=2)
    work, _ = step.prepare(b, step.generation(0, 0))
    union = work["union"]
    seqs, positions = work["teacher_inputs"]
    ids, cu = packed(seqs, union.ids.device)
    with torch.no_grad():
        logits = teacher(ids, work["micro"]["audio_features"], cu)[:, 0]
    logp = torch.log_softmax(logits.double(), -1)
    rows = torch.tensor([int(cu[i]) + p for i, pos in enumerate(positions) for p in pos])
    expected = logp[rows].gather(1, union.ids.clamp(min=0))
    valid = union.valid
    assert valid[:, :8].any() and valid[:, 8:].any()  # teacher and student-only entries
    assert torch.allclose(union.teacher_scores[valid].double(), expected[valid], atol=1e-5)
    # the teacher half of each row is the teacher's own top-k (one tokenizer: the identity map)
    top = logp[rows].topk(8).indices
    assert torch.equal(union.ids[:, :8].sort(1).values, top.sort(1).values)


def test_cross_tokenizer_map_and_alignment(single_rank):
    s_tok, t_tok = tokenizer(300), tokenizer(360, split="heldout")
    tmap = TokenMap(s_tok, t_tok, 384, 512)
    assert not tmap.identity and 0.5 < tmap.coverage < 1.0
    s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
    for token, sid in list(s_vocab.items())[:200]:
        tid = int(tmap.to_teacher(torch.tensor([sid]))[0])
        assert tid == t_vocab.get(token, -1)
        if tid >= 0:
            assert int(tmap.to_student(torch.tensor([tid]))[0]) == sid
    text = "I read the newspaper avidly."
    s_enc, t_enc = s_tok.encode(text), t_tok.encode(text)
    index = align_by_characters(s_enc.offsets, t_enc.offsets)
    for j, k in enumerate(index):
        if k >= 0:
            assert s_enc.offsets[j][0] == t_enc.offsets[k][0]
    mixed = "我们一起去 school today"  # multi-byte characters split over byte-level tokens
    enc = s_tok.encode(mixed)
    spans = byte_spans(s_tok, enc.ids)
    assert spans[-1][1] == len(mixed.encode("utf-8"))
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    firsts = [j for j in range(len(spans)) if j == 0 or enc.offsets[j][0] != enc.offsets[j - 1][0]]
    for j in firsts:  # a token that starts a character starts at that character's first byte
        assert spans[j][0] == len(mixed[: enc.offsets[j][0]].encode("utf-8"))
    with pytest.raises(ValueError, match="min_coverage"):
        TokenMap(s_tok, t_tok, 384, 512, min_coverage=0.999)
    assert TokenMap(s_tok, s_tok, 384, 384).identity
    for lookup, name in ((tmap.to_student, "t2s"), (tmap.to_teacher, "s2t")):
        assert lookup(torch.tensor([1, 2], device="meta")).device.type == "meta"
        table = getattr(tmap, name)  # moved to the ids' device and kept there
        assert table.device.type == "meta" and lookup(torch.tensor([3], device="meta")) is not None
        assert getattr(tmap, name) is table


def test_opd_step_with_two_tokenizers(single_rank):
    sp = PromptBuilder.student(tokenizer())
    student = model("tiny_ark_asr", sp, seed=0, scale=3.0)
    step, _, _ = opd_step(student, teacher_tokenizer=tokenizer(360, split="heldout"))
    metrics = step([batch(sp)])
    assert not step.map.identity
    assert 0.0 <= metrics["mismatch"] < 1.0 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert metrics["positions"] > 0


@pytest.mark.parametrize("fallback", [True, False])
def test_empty_rollouts(single_rank, fallback):
    sp = PromptBuilder.student(tokenizer())
    student = model("tiny_ark_asr", sp, seed=0, scale=3.0)
    step, _, _ = opd_step(student, fallback=fallback)
    stop_at_once(step, sp)
    metrics = step([batch(sp)])
    assert metrics["rollout_nonempty"] == 0.0
    if fallback:  # the references are used instead, and counted
        assert metrics["fallbacks"] == 3 and metrics["positions"] > 0
        assert torch.isfinite(torch.tensor(metrics["loss"]))
    else:
        assert metrics["fallbacks"] == 0 and metrics["skipped"] == 1 and "loss" not in metrics
        assert metrics["positions"] == 0


def test_agreement_metrics_on_a_known_union():
    from ark_mega.kernels import union_support
    from ark_mega.opd.steps import agreement

    teacher = torch.tensor([[5, 7], [1, 2]])
    student = torch.tensor([[5, 9], [3, 1]])  # row 0 agrees on the top-1, row 1 does not
    t_logp = torch.tensor([[0.6, 0.3], [0.5, 0.4]]).log()
    s_at = torch.tensor([[0.6, 0.05], [0.01, 0.5]]).log()
    union = union_support(teacher, student, t_logp, s_at, impl="torch")
    logits = torch.zeros(union.ids.shape)  # a uniform student over each union
    m = agreement(logits, union, student, tau=1.0)
    assert m["top1_agree"].item() == pytest.approx(0.5)
    # teacher mass inside the union: row 0 {5, 7, 9}: 0.6 + 0.3 + 0.05; row 1 {1, 2, 3}: 0.5 + 0.4 + 0.01
    assert m["teacher_mass"].item() == pytest.approx((0.95 + 0.91) / 2, rel=1e-6)
    assert 0 < m["kl_p50"] <= m["kl_p90"] <= m["kl_max"]


def test_agreement_quantiles_cover_the_counted_rows_without_reading_the_device(host_reads):
    """The KL quantiles over the rows the loss counts (at least two valid ids), as selecting
    those rows would give them, with no host read of a device tensor (it would wait for the
    GPU between the student's forward and backward); zeros when no row counts."""
    from ark_mega.kernels.union_kl import union_kl_rows
    from ark_mega.opd.steps import agreement

    gen = torch.Generator().manual_seed(0)
    n, u = 40, 6
    logits = torch.randn(n, u, generator=gen)
    valid = torch.rand(n, u, generator=gen) < 0.5
    valid[:5] = False  # rows the loss does not count
    valid[5:, :2] = True
    union = UnionSupport(torch.arange(n * u).reshape(n, u).where(valid, -1), valid,
                         torch.randn(n, u, generator=gen).log_softmax(-1).where(valid, 0.0),
                         valid.sum(1).float().mean())
    kl, counted = union_kl_rows(logits, union.teacher_scores, valid, 1.0)
    host_reads.clear()
    m = agreement(logits, union, union.ids, tau=1.0)
    assert not host_reads
    ref = torch.quantile(kl[counted], torch.tensor([0.5, 0.9]))
    assert torch.equal(torch.stack([m["kl_p50"], m["kl_p90"]]), ref)
    assert torch.equal(m["kl_max"], kl[counted].max())
    none = UnionSupport(union.ids, torch.zeros_like(valid), union.teacher_scores, union.vuss)
    m = agreement(logits, none, union.ids, tau=1.0)
    assert [m[k].item() for k in ("kl_p50", "kl_p90", "kl_max")] == [0.0, 0.0, 0.0]
