"""Compile every Triton kernel of ark_mega for a GPU architecture, on a machine without a GPU.

    python tools/compile_kernels.py              # sm_90 (H100 / H200)
    python tools/compile_kernels.py --arch 80    # A100
    python tools/compile_kernels.py --ir _grad_hidden_kernel   # and that kernel's layouts

Each op runs once on tiny CPU inputs under Triton's interpreter (in a subprocess), which
records every kernel launch with the arguments the op passes, specialized as a GPU launch
specializes them (pointers and integers divisible by 16, which set vector widths, layouts and
registers); each launch is then compiled for the target by Triton (with its own ptxas), once
per launch configuration its autotuner may pick on a GPU. Prints each kernel's registers,
stack and shared memory, and exits 1 if any fails to compile: such a failure would otherwise
cost minutes of a GPU lent for a short time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_every_op() -> None:
    """Each op once, forward and backward, on two rows with the block sizes of the real widths
    (top-k 32 and 64; heads of 128 with full and 64 with half rotary; a hidden width of 256
    already gives the largest blocks; the decoding attention and norms of both student
    families), so the registers are those of training and decoding."""
    from ark_mega.kernels import sparse_lm_head, teacher_topk, union_kl, union_support
    from ark_mega.kernels.add_rms_norm import add_rms_norm
    from ark_mega.kernels.decode_attention import decode_attention
    from ark_mega.kernels.rope import packed_rope, rope_tables, tables_at
    from ark_mega.kernels.split_k_linear import split_k_linear
    from ark_mega.kernels.swiglu_linear import swiglu_linear

    gen = torch.Generator().manual_seed(0)
    n, v, h = 2, 128, 256
    for k in (32, 64):
        hidden = torch.randn(n, h, generator=gen, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(v, h, generator=gen, dtype=torch.bfloat16, requires_grad=True)
        ids = torch.randint(0, v, (n, 2 * k), generator=gen)
        sparse_lm_head(hidden, weight, ids, impl="triton").sum().backward()
        student = torch.randint(0, v, (n, k), generator=gen)
        top = teacher_topk(k, student, logits=torch.randn(n, v, generator=gen), impl="triton")
        union = union_support(top.ids, student, top.logprobs, top.logprobs_at_student,
                              impl="triton")
        logits = torch.randn(n, 2 * k, generator=gen, requires_grad=True)
        for divergence in ("forward_kl", "reverse_kl", "jsd"):
            union_kl(logits, union.teacher_scores, union.valid, divergence=divergence,
                     impl="triton").backward()
    for hn, rot in ((128, 128), (64, 32)):
        cos, sin = rope_tables(torch.rand(16, 1, 1, rot, generator=gen), torch.bfloat16)
        x = torch.randn(10, 4, hn, generator=gen, dtype=torch.bfloat16, requires_grad=True)
        packed_rope(x, *tables_at(cos, sin, (0, 3, 10)), impl="triton").sum().backward()
    for heads, groups, hn in ((14, 2, 64), (16, 8, 128)):  # Ark-ASR's and Qwen3-ASR's students
        per = heads // groups  # q / k / v as views of one projection, as the decoding step's
        fused = torch.randn(1, 2, groups, (per + 2) * hn, dtype=torch.bfloat16, generator=gen)
        cos, sin = rope_tables(torch.rand(70, 1, 1, hn, generator=gen), torch.bfloat16)
        cache = [torch.zeros(2, groups, 70, hn, dtype=torch.bfloat16) for _ in range(2)]
        for splits in (1, 2):  # one part (no merge), and parts merged
            decode_attention(fused[..., :per * hn].unflatten(-1, (per, hn)),
                             fused[..., per * hn:(per + 1) * hn], fused[..., (per + 1) * hn:],
                             cos, sin, torch.tensor([66]), *cache,
                             torch.zeros(2, 1, 1, 70, dtype=torch.bfloat16), None,
                             impl="triton", splits=splits)
    for width in (896, 1024):  # Ark-ASR's and Qwen3-ASR's students
        hidden = torch.randn(1, 2, width, dtype=torch.bfloat16, generator=gen)
        add_rms_norm(hidden, hidden, hidden[0, 0], 1e-6, impl="triton")
        # the MLP width changes no block or register: a narrow one keeps the interpreter quick
        swiglu_linear(hidden, torch.randn(2 * 64, width, dtype=torch.bfloat16, generator=gen),
                      impl="triton")
        # an output projection in 2 slices, summed by the add after it
        parts = split_k_linear(hidden, torch.randn(width, width, dtype=torch.bfloat16,
                                                   generator=gen), splits=2, impl="triton")
        add_rms_norm(hidden, parts, hidden[0, 0], 1e-6, impl="triton")


def record_launches(path: str) -> None:
    """Under the interpreter: each distinct launch's kernel (module, name), its arguments'
    specialization as a GPU's launch makes it (type, and 16-divisibility of pointers and
    integers, which decides vector widths and layouts) and its options, as JSON lines in `path`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    seen = {}
    original = InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        jit = JITFunction(self.fn)
        values = dict(zip(jit.arg_names, args)) | kwargs
        bind = create_function_from_signature(jit.signature, jit.params, backend)
        _, specialization, _ = bind(**{name: values[name] for name in jit.arg_names})
        launch = {"module": self.fn.__module__, "name": self.fn.__name__,
                  "specialization": dict(zip(jit.arg_names, specialization)),
                  "options": {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}}
        seen.setdefault(json.dumps(launch, sort_keys=True), launch)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = record
    try:
        run_every_op()
    finally:
        InterpretedFunction.run = original
    with open(path, "w") as f:
        f.writelines(json.dumps(launch) + "\n" for launch in seen.values())


def compile_launch(launch: dict, target):
    """Each GPU configuration of one recorded launch: (label, compiled kernel or the error)."""
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    backend = make_backend(target)
    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    configs = kernel.configs if isinstance(kernel, triton.runtime.Autotuner) else [None]
    jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    spec = launch["specialization"]
    for config in configs:
        constexprs = {name: value for name, (kind, value) in spec.items() if kind == "constexpr"}
        constexprs |= config.kwargs if config else {}
        signature = {p.name: "constexpr" if p.name in constexprs else spec[p.name][0]
                     for p in jit.params}
        attrs = {(i,): backend.parse_attr(spec[p.name][1]) for i, p in enumerate(jit.params)
                 if p.name not in constexprs and isinstance(spec[p.name][1], str)}
        options = {**launch["options"], **({"num_warps": config.num_warps,
                                             "num_stages": config.num_stages} if config else {})}
        label = launch["name"] + "".join(f" {k}={v}" for k, v in constexprs.items())
        label += "".join(f" {k}={v}" for k, v in options.items())
        try:
            yield label, triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                        options=options)
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            yield label, e


def resources(compiled) -> str:
    """Registers, spill stores and shared memory of the cubin (cuobjdump, shipped with Triton)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = {key: re.search(rf"\b{key}:(\d+)", out) for key in ("REG", "STACK", "SHARED", "LOCAL")}
    return ", ".join(f"{key.lower()} {m.group(1)}" for key, m in found.items() if m)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90)")
    ap.add_argument("--ir", metavar="KERNEL",
                    help="also print the Triton GPU IR (layouts, reductions) of this kernel")
    ap.add_argument("--record", help=argparse.SUPPRESS)  # the interpreted subprocess's output
    args = ap.parse_args()
    if args.record:
        record_launches(args.record)
        return 0
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.jsonl")
        subprocess.run([sys.executable, __file__, "--record", path], check=True,
                       env=dict(os.environ, TRITON_INTERPRET="1"))
        with open(path) as f:
            launches = [json.loads(line) for line in f]
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for launch in launches:
        for label, result in compile_launch(launch, target):
            if isinstance(result, Exception):
                failures += 1
                print(f"FAILED  {label}: {type(result).__name__}: {str(result).strip()[:2000]}")
            else:
                used = resources(result)
                spills = re.search(r"(stack|local) [1-9]", used)
                print(f"{'SPILLS' if spills else 'ok':8}{label}: {used}")
                if launch["name"] == args.ir:
                    print(result.asm["ttgir"])
    print(f"compile_kernels: sm_{args.arch}, {len(launches)} launches, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
