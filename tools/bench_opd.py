"""Benchmark one OPD step: ark_mega against the authors' way, on the same weights, in one run.

    python tools/bench_opd.py                 # 1 GPU: ark_asr_0p6b student, qwen3_asr_1p7b teacher,
                                              # random weights, bf16, 16 utterances of 30 s
    python tools/bench_opd.py --smoke         # tiny models on the CPU: checks the script runs

ark_mega: OPDStep (KV-cache rollout in our megatron model, teacher scoring at the scored positions
only, union support, sparse LM head and union KL kernels, backward).
baseline (the authors' way): the same weights in transformers' models (through the conversion
maps); rollouts with transformers' `generate` on a padded batch; teacher and student forwards
with full-vocabulary logits; the union built per position in Python; the same loss equation
(one kind of teacher score per row); backward.
Both paths then score one shared rollout (ours), and their losses must agree (checked).
Reports the step time and its split; writes JSON with --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import warnings

import torch

from device_speed import compiled_graphs, write_profile


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(args):
    from ark_mega.config import OPDSettings
    from ark_mega.config import GenerationConfig
    from ark_mega.opd.steps import OPDStep
    from ark_mega.opd.token_map import TokenMap
    from ark_mega.transcribe import blocked_ids
    from random_models import random_model, toy_tokenizer

    tok = toy_tokenizer()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    student, sp = random_model(args.student, tok, dtype, dev, tiny=args.smoke, seed=0)
    teacher, tp = random_model(args.teacher, tok, dtype, dev, tiny=args.smoke, seed=1)
    teacher.eval()
    with torch.no_grad():  # larger random weights: rollouts that vary from token to token
        for p in list(student.parameters()) + list(teacher.parameters()):
            p.mul_(args.weight_scale)
    for p in teacher.parameters():
        p.requires_grad_(False)
    settings = OPDSettings(top_k=args.k, generation=GenerationConfig(
        max_new_tokens=args.max_new_tokens, top_k=args.k))
    s_vocab, t_vocab = student.cfg.decoder.vocab_size, teacher.cfg.decoder.vocab_size
    blocked = blocked_ids(sp, s_vocab).to(dev)
    step = OPDStep(student, teacher, sp, tp, TokenMap(tok, tok, s_vocab, t_vocab), settings, blocked)
    return step, sp, tp, student, teacher, blocked, dev, dtype


def hf_copies(student, teacher, dtype, dev):
    """transformers' models with our weights (TP = PP = 1)."""
    from ark_mega.convert.hf_maps import megatron_to_hf
    from ark_mega.models.families import family

    out = []
    for model in (student, teacher):
        layout = family(model.cfg.family).transformers_layout
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        with torch.device(dev):  # initialised where it runs: a 1.7B init on CPU takes long
            hf = layout.transformers_model(model.cfg).to(dtype)
        hf.load_state_dict(megatron_to_hf({(0, 0): state}, layout.name, model.cfg), strict=True)
        out.append(hf.to(dev).eval())
    out[1].requires_grad_(False)
    return out


def padded(seqs, pad, dev, left=False):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=dev)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, device=dev)
        mask[i, sl] = 1
    return ids, mask


def baseline_loss(hf_student, hf_teacher, sp, tp, feats, answers, topk_student, k, tau, dev):
    """The authors' way of scoring given answers: full logits, a union per position in Python."""
    from ark_mega.data.prompts import infer_language

    frames = [f.shape[-1] for f in feats]
    s_prompts = [sp.build(n).input_ids for n in frames]
    t_prompts = [tp.build(n).input_ids + tp.answer_prefix(infer_language(sp.tokenizer.decode(a)))
                 for n, a in zip(frames, answers)]
    batch_feats = torch.stack(feats)
    fmask = torch.ones(batch_feats.shape[0], batch_feats.shape[-1], dtype=torch.long, device=dev)
    ids, mask = padded([t + a for t, a in zip(t_prompts, answers)], 0, dev)
    with torch.no_grad():
        t_logp = torch.log_softmax(hf_teacher(input_ids=ids, attention_mask=mask,
                                              input_features=batch_feats.to(hf_teacher.dtype),
                                              input_features_mask=fmask).logits.float(), -1)
    ids, mask = padded([s + a for s, a in zip(s_prompts, answers)], 0, dev)
    s_logits = hf_student(input_ids=ids, attention_mask=mask,
                          input_features=batch_feats.to(hf_student.dtype),
                          input_features_mask=fmask).logits.float()  # [B, T, V]
    losses, row = [], 0
    for i, ans in enumerate(answers):
        for j in range(len(ans)):
            t_row = t_logp[i, len(t_prompts[i]) - 1 + j]
            s_row = s_logits[i, len(s_prompts[i]) - 1 + j]
            support = {}  # id -> teacher log-prob, teacher top-k first, then the student's ids
            vals, top = t_row.topk(k)
            for v, t in zip(vals.tolist(), top.tolist()):
                support[t] = v
            for s in topk_student[row].tolist():
                support.setdefault(s, t_row[s].item())
            row += 1
            if len(support) < 2:
                continue
            index = torch.tensor(list(support), device=dev)
            p = torch.softmax(torch.tensor(list(support.values()), device=dev) / tau, 0)
            log_q = torch.log_softmax(s_row[index] / tau, 0)
            losses.append(tau ** 2 * (p * (p.log() - log_q)).sum())
    return torch.stack(losses).mean()


def baseline_step(hf_student, hf_teacher, sp, tp, feats, blocked, args, dev, dtype):
    """One OPD step the authors' way: transformers' generate on a padded batch, then the loss
    from full-vocabulary logits, and backward. Returns (rollout seconds, total seconds)."""
    frames = feats[0].shape[-1]
    s_prompts = [sp.build(f.shape[-1]).input_ids for f in feats]
    sync()
    t0 = time.perf_counter()
    ids, mask = padded(s_prompts, 0, dev, left=True)
    fmask = torch.ones(len(feats), frames, dtype=torch.long, device=dev)
    with torch.no_grad():
        out = hf_student.generate(
            input_ids=ids, attention_mask=mask, input_features=torch.stack(feats).to(dtype),
            input_features_mask=fmask, max_new_tokens=args.max_new_tokens, do_sample=False,
            eos_token_id=sp.stop_id, pad_token_id=sp.stop_id,
            suppress_tokens=blocked.nonzero().squeeze(-1).tolist(),
            output_scores=True, return_dict_in_generate=True)
    sync()
    t1 = time.perf_counter()
    answers, topk = [], []
    for i in range(len(feats)):
        toks = out.sequences[i, ids.shape[1]:].tolist()
        n = toks.index(sp.stop_id) + 1 if sp.stop_id in toks else len(toks)
        answers.append(toks[:n])
        topk += [out.scores[j][i].topk(args.k).indices for j in range(n)]
    loss = baseline_loss(hf_student, hf_teacher, sp, tp, feats, answers, torch.stack(topk),
                         args.k, 1.0, dev)
    loss.backward()
    sync()
    return t1 - t0, time.perf_counter() - t0


def main() -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default="ark_asr_0p6b")
    ap.add_argument("--teacher", default="qwen3_asr_1p7b")
    ap.add_argument("--utterances", type=int, default=16)  # 64 x 30 s: ~76 GiB of activations
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--weight-scale", type=float, default=1.0)
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    ap.add_argument("--no-baseline", action="store_true",
                    help="ours only (the baseline needs transformers' GlmAsr and Qwen3ASR models)")
    ap.add_argument("--profile", help="write where the time of our step goes (torch.profiler) here")
    ap.add_argument("--out", help="write the results as JSON here (ours first, then completed)")
    args = ap.parse_args()
    if args.smoke:
        args.student, args.teacher, args.utterances, args.seconds = "tiny_ark_asr", "tiny_qwen3_asr", 3, 2.0
        args.k, args.max_new_tokens, args.weight_scale = 8, 6, 3.0
    elif not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU; --smoke checks the script on the CPU")
        return 2

    from ark_mega.data.batching import Batch
    from ark_mega.distributed import ParallelConfig, init_parallel
    from ark_mega.kernels import sparse_lm_head, union_kl

    init_parallel(ParallelConfig())
    step, sp, tp, student, teacher, blocked, dev, dtype = build(args)
    gen = torch.Generator().manual_seed(1)
    frames = int(args.seconds * 100)
    feats = [torch.randn(128, frames, generator=gen).to(dev) for _ in range(args.utterances)]

    def first(n: int) -> Batch:
        """The first n utterances as a batch (an OPD step needs only their audio)."""
        return Batch(None, None, None, None, feats[:n], [str(i) for i in range(n)], [""] * n, 0)

    batch = first(len(feats))

    # ---- ark_mega: one full OPD step, after one on 2 utterances and one on 3 (every size that
    # changes with the batch changed once, so torch.compile builds its functions for dynamic
    # shapes) and one on the full batch, timed and reported: paths the small batches never take
    # (the loss head's split id segments) are compiled and autotuned in it, a cost of the first
    # steps of a run
    few = first(2)
    step([few])
    step([first(3)])

    def timed_step() -> tuple[dict, float]:
        student.zero_grad()
        sync()
        t0 = time.perf_counter()
        metrics = step([batch])
        sync()
        return metrics, time.perf_counter() - t0

    first_total = timed_step()[1]
    compiles = compiled_graphs()
    ours, ours_total = timed_step()
    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)",
        "setup": {"student": args.student, "teacher": args.teacher, "utterances": args.utterances,
                  "seconds": args.seconds, "k": args.k, "max_new_tokens": args.max_new_tokens,
                  "dtype": str(dtype)},
        "ours_s": ours_total, "ours_first_full_step_s": first_total,
        "ours_rollout_s": ours["time_rollout"],
        "ours_teacher_s": ours["time_teacher"], "ours_student_s": ours["time_student"],
        "ours_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
        "ours_compiles_in_timed_step": compiled_graphs() - compiles,
    }
    report_so_far(result, result, args.out)  # written before the baseline runs, which may fail
    if args.profile:  # our step on the warm-up's 2 utterances
        write_profile(args.profile, lambda: step([few]), dev)
    if args.no_baseline:
        return 0

    # ---- baseline: one full step the authors' way (after one on a small batch, likewise)
    hf_student, hf_teacher = hf_copies(student, teacher, dtype, dev)
    baseline_step(hf_student, hf_teacher, sp, tp, feats[:2], blocked, args, dev, dtype)
    base_rollout, base_total = baseline_step(hf_student, hf_teacher, sp, tp, feats, blocked,
                                             args, dev, dtype)

    # ---- one shared rollout (ours), scored both ways: the losses must agree
    work, _ = step.prepare(batch, step.generation(0, 0))
    flat, union, keep = work["flat"], work["union"], work["keep"]
    with torch.no_grad():
        hidden = student(work["micro"]["input_ids"], work["micro"]["audio_features"],
                         work["micro"]["cu_seqlens"], return_hidden=True)[flat, 0]
        shared_ours = union_kl(sparse_lm_head(hidden, student.output_weight(), union.ids),
                               union.teacher_scores, union.valid).item()
        shared_base = baseline_loss(hf_student, hf_teacher, sp, tp, [feats[i] for i in keep],
                                    work["answers"], work["student_topk"], args.k, 1.0, dev).item()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    agree = abs(shared_ours - shared_base) <= tolerance * max(1.0, abs(shared_base))

    base = {
        "baseline_s": base_total, "baseline_rollout_s": base_rollout,
        "speedup": base_total / ours_total,
        "shared_rollout_loss_ours": shared_ours, "shared_rollout_loss_baseline": shared_base,
        "losses_agree": agree,
    }
    result.update(base)
    report_so_far(base, result, args.out)
    return 0 if agree else 1


def report_so_far(new: dict, result: dict, out: str | None) -> None:
    """Print the new figures; write all of them so far."""
    for key, val in new.items():
        print(f"{key:>32}: {val}", flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
