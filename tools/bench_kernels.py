"""Benchmark: the OPD loss head, naive PyTorch path against the fused kernels, in one run.

    python tools/bench_kernels.py                 # H100 defaults: N=16384, V=151936, H=1024, k=32, bf16
    python tools/bench_kernels.py --smoke         # tiny shapes on the CPU: checks the script runs

naive: full student logits [N, V] = hidden @ W^T, gather at the union ids, log-softmax over the
       union, KL, backward through all of it (PyTorch references).
fused: sparse LM head at the union ids + union KL (Triton kernels), forward and backward.
Reports the median time of forward + backward (CUDA events, triton.testing.do_bench), also of
the fused path when 8 ids are in every row's union (as frequent tokens are), the peak memory
above the inputs, and the union-KL kernel's bandwidth against a device-to-device copy
measured in the same run. Writes the numbers as JSON with --out.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

from device_speed import copy_gbps, peak_mib, report, timed, write_profile


def make_inputs(n, v, h, k, dtype, device, seed=0, common=0):
    """Hidden states, output layer and union support. With `common`, the first `common` teacher
    ids are the same in every row, as frequent tokens (the stop token, punctuation) are in real
    top-k lists: each is one id segment of the weight gradient with an entry in every row."""
    from ark_mega.kernels import union_support

    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, device=device, dtype=dtype)
    weight = torch.randn(v, h, generator=gen, device=device, dtype=dtype) * h ** -0.5
    # top-k ids: random, about half shared between teacher and student
    teacher = torch.randint(0, v, (n, k), generator=gen, device=device)
    student = torch.randint(0, v, (n, k), generator=gen, device=device)
    shared = torch.rand(n, k, generator=gen, device=device) < 0.5
    student = torch.where(shared, teacher, student)
    teacher[:, :common] = torch.arange(common, device=device)
    t_scores = torch.randn(n, k, generator=gen, device=device).log_softmax(-1)
    s_scores = torch.randn(n, k, generator=gen, device=device).log_softmax(-1) - 2.0
    support = union_support(teacher, student, t_scores, s_scores)
    return hidden, weight, support


def union_kl_inputs(rows, u, device, seed=1):
    """Student logits, teacher log-probs and a valid mask [rows, u], about 3/4 valid."""
    gen = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(rows, u, generator=gen, device=device)
    t = torch.randn(rows, u, generator=gen, device=device).log_softmax(-1)
    return s, t, torch.rand(rows, u, generator=gen, device=device) < 0.75


def naive_step(hidden, weight, support, tau):
    from ark_mega.kernels.union_kl import union_kl_reference

    logits = hidden @ weight.t()  # [N, V]
    s = logits.gather(1, support.ids.clamp(min=0)).float()
    loss = union_kl_reference(s, support.teacher_scores, support.valid, tau)
    loss.backward()
    return loss


def fused_step(hidden, weight, support, tau, impl):
    from ark_mega.kernels import sparse_lm_head, union_kl

    s = sparse_lm_head(hidden, weight, support.ids, impl=impl)
    loss = union_kl(s, support.teacher_scores, support.valid, tau, impl=impl)
    loss.backward()
    return loss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--kl-rows", type=int, default=262144,
                    help="rows of the union-KL bandwidth figure (a 256 x 1,024-token batch): at "
                         "16,384 rows its 10 us kernel is shorter than the launch path")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--profile", help="write where the time of one call goes (torch.profiler) here")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    if args.smoke:
        args.n, args.vocab, args.hidden, args.k, args.kl_rows = 64, 512, 32, 4, 64
        # the kernels' code paths through Triton's interpreter (TRITON_INTERPRET=1)
        device, dtype, impl, reps = torch.device("cpu"), torch.float32, "auto", 2
    else:
        if not torch.cuda.is_available():
            print("this benchmark needs a CUDA GPU; --smoke checks the script on the CPU")
            return 2
        device, dtype, impl, reps = torch.device("cuda"), torch.bfloat16, "triton", 0

    hidden, weight, support = make_inputs(args.n, args.vocab, args.hidden, args.k, dtype, device)
    hidden.requires_grad_()
    weight.requires_grad_()

    def run(step):
        def fn():
            hidden.grad = weight.grad = None
            step()
        return fn

    naive = run(lambda: naive_step(hidden, weight, support, args.tau))
    fused = run(lambda: fused_step(hidden, weight, support, args.tau, impl))

    # the two paths compute one loss and one gradient
    hidden.grad = weight.grad = None
    loss_naive = naive_step(hidden, weight, support, args.tau)
    g_naive = hidden.grad.float().clone()
    hidden.grad = weight.grad = None
    loss_fused = fused_step(hidden, weight, support, args.tau, impl)
    g_fused = hidden.grad.float()
    grad_rel = ((g_fused - g_naive).norm() / g_naive.norm()).item()

    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
        "shape": dict(N=args.n, V=args.vocab, H=args.hidden, k=args.k, dtype=str(dtype)),
        "loss_naive": loss_naive.item(), "loss_fused": loss_fused.item(),
        "hidden_grad_rel_diff": grad_rel,
        "naive_ms": timed(naive, device, reps), "fused_ms": timed(fused, device, reps),
        "naive_peak_mib": peak_mib(naive, device), "fused_peak_mib": peak_mib(fused, device),
    }
    result["speedup"] = result["naive_ms"] / result["fused_ms"]
    result["memory_ratio"] = result["naive_peak_mib"] / result["fused_peak_mib"]
    # the fused path with 8 ids in every row's union: the long id segments of real top-k lists
    skewed = make_inputs(args.n, args.vocab, args.hidden, args.k, dtype, device,
                         common=min(8, args.k))[2]
    result["fused_common_ids_ms"] = timed(
        run(lambda: fused_step(hidden, weight, skewed, args.tau, impl)), device, reps)

    from ark_mega.kernels import union_kl
    from ark_mega.kernels.union_kl import union_kl_kernel

    kl = union_kl_inputs(args.kl_rows, 2 * args.k, device)
    # read student logits, teacher scores, valid; write the gradient; per row: kl, counted
    kl_bytes = kl[0].numel() * (4 + 4 + 1 + 4) + args.kl_rows * 8
    result["union_kl_rows"] = args.kl_rows
    result["copy_gbps"] = copy_gbps(device, mib=1024 if device.type == "cuda" else 64)
    # the op (kernel, then the sums over rows and the division: five more small launches) and
    # the kernel alone (its outputs allocated, one launch)
    for name, fn in (("union_kl", lambda: union_kl(*kl, args.tau, impl=impl)),
                     ("union_kl_kernel",
                      lambda: union_kl_kernel(*kl, args.tau, "forward_kl", 0.5))):
        result[f"{name}_gbps"] = kl_bytes / timed(fn, device, reps) / 1e6
        result[f"{name}_fraction_of_copy"] = result[f"{name}_gbps"] / result["copy_gbps"]
    from ark_mega.kernels._backend import chosen_configs

    result["tuned_configs"] = chosen_configs()

    report(result, args.out)
    if args.profile:  # the fused loss head, forward and backward
        write_profile(args.profile, fused, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
