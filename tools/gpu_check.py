"""Check a GPU node: every GPU path of ark_mega and its benchmarks, in one command.

    python tools/gpu_check.py --out DIR                     # one GPU: about 7 minutes on an H100
    python tools/gpu_check.py --out DIR --only decode,sft   # some parts
    python tools/gpu_check.py --smoke --out DIR             # the same harness, tiny shapes, CPU

Each part runs in its own subprocess under its own time limit (and the run's `--budget`), most
important first; its figures, or the end of its error, go into DIR/gpu_check.json and
DIR/gpu_check.md (a table for docs/benchmarks.md) after every part, so a run cut short keeps
what it measured. Each part's output is in DIR/<part>.log; each benchmark also writes where
the time of one call goes (torch.profiler) to DIR/<part>.profile.txt.

  kernels        tests/test_kernels.py with the kernels compiled for the GPU (no interpreter),
                 tests/test_attention.py (variable-length flash attention) and
                 tests/test_decode_step.py (CUDA-graph decoding against eager); in 4
                 processes where pytest-xdist is installed (the `dev` extra)
  bench_kernels  loss head naive vs fused; union-KL bandwidth against a copy (tools/bench_kernels.py)
  trainer        SFT, resume, TD and OPD steps on the device (tools/check_trainer.py)
  bench_opd      one OPD step, ours against the authors' way (tools/bench_opd.py)
  real_ark, real_qwen3   forward + backward at real shapes (tools/smoke_real_shapes.py)
  decode         rollout tokens/s against the weight-streaming floor (tools/bench_decode.py)
  sft            SFT tokens/s and MFU of ark_asr_0p6b (tools/bench_sft.py)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")


@dataclass
class Part:
    name: str
    limit_s: int  # on a GPU; each part gets at most what is left of the budget
    targets: dict  # figure -> (comparison, value), the targets for one H100

    def command(self, out: str, smoke: bool) -> list[str]:
        py = sys.executable
        json_out = os.path.join(out, f"{self.name}.json")
        tiny = ["--smoke"] if smoke else []
        if self.name == "kernels":
            select = ["-k", "union_kl_kernel or union_support"] if smoke else []
            # compiling the kernels for each test's shapes is most of this part's time (100 s
            # serially in run 7): with pytest-xdist the tests share it out over processes
            if not smoke and importlib.util.find_spec("xdist") is not None:
                select = ["-n", str(KERNEL_TEST_PROCESSES)]
            return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *select,
                    f"--junitxml={self.result_file(out)}",
                    os.path.join(ROOT, "tests", "test_kernels.py"),
                    os.path.join(ROOT, "tests", "test_attention.py"),
                    os.path.join(ROOT, "tests", "test_decode_step.py")]
        if self.name == "trainer":  # the smoke's OPD runs interpreted kernels: one short step
            steps = ["--opd-steps", "1", "--max-new-tokens", "6"] if smoke else []
            return [py, os.path.join(TOOLS, "check_trainer.py"),
                    "--out", os.path.join(out, "trainer"), *steps]
        if self.name.startswith("real_"):
            preset = {"real_ark": "ark_asr_0p6b", "real_qwen3": "qwen3_asr_1p7b"}[self.name]
            shape = ["--seconds", "10", "--batch", "2"]
            if smoke:
                preset, shape = "tiny_" + preset.rsplit("_", 1)[0], ["--seconds", "2", "--text-tokens", "8"]
            return [py, os.path.join(TOOLS, "smoke_real_shapes.py"), "--preset", preset, *shape,
                    "--out", json_out]
        script = {"bench_kernels": "bench_kernels.py", "bench_opd": "bench_opd.py",
                  "decode": "bench_decode.py", "sft": "bench_sft.py"}[self.name]
        profile = ["--profile", os.path.join(out, f"{self.name}.profile.txt")]  # where time goes
        return [py, os.path.join(TOOLS, script), *tiny, *profile, "--out", json_out]

    def result_file(self, out: str) -> str:
        if self.name == "trainer":
            return os.path.join(out, "trainer", "check_trainer.json")
        if self.name == "kernels":
            return os.path.join(out, "kernels.xml")
        return os.path.join(out, f"{self.name}.json")


KERNEL_TEST_PROCESSES = 4

PARTS = [
    Part("kernels", 180, {}),
    Part("bench_kernels", 90, {"speedup": (">=", 10), "memory_ratio": (">=", 20),
                               "union_kl_kernel_fraction_of_copy": (">=", 0.7)}),
    Part("trainer", 150, {}),
    Part("bench_opd", 180, {"speedup": (">=", 5)}),
    Part("real_ark", 60, {}),
    Part("real_qwen3", 60, {}),
    Part("decode", 150, {"fraction_of_floor": (">=", 0.3)}),
    Part("sft", 90, {"mfu": (">=", 0.25)}),
]

# the figures each part reports in the table (all of them are in gpu_check.json)
SHOWN = {
    "kernels": ("tests", "failures", "errors", "skipped"),
    "bench_kernels": ("naive_ms", "fused_ms", "speedup", "fused_common_ids_ms", "naive_peak_mib",
                      "fused_peak_mib", "memory_ratio", "copy_gbps", "union_kl_gbps",
                      "union_kl_fraction_of_copy", "union_kl_kernel_gbps",
                      "union_kl_kernel_fraction_of_copy", "hidden_grad_rel_diff"),
    "trainer": ("passed", "resume_logged_steps"),
    "bench_opd": ("ours_s", "ours_first_full_step_s", "ours_rollout_s", "ours_teacher_s",
                  "ours_student_s", "baseline_s",
                  "speedup", "losses_agree", "ours_peak_gib", "ours_compiles_in_timed_step"),
    "real_ark": ("layers", "dtype", "tokens", "fwd_bwd_s", "peak_gib", "grads_finite"),
    "real_qwen3": ("layers", "dtype", "tokens", "fwd_bwd_s", "peak_gib", "grads_finite"),
    "decode": ("prefill_s", "decode_ms_per_step", "decode_tokens_per_s", "floor_tokens_per_s",
               "fraction_of_floor", "rollout_decode_tokens_per_s", "first_rollout_extra_s",
               "cuda_graph", "eager_decode_tokens_per_s", "variants_ms_per_step", "copy_gbps"),
    "sft": ("step_ms", "tokens_per_s", "achieved_tflops", "matmul_peak_tflops", "mfu", "peak_gib"),
}


def versions() -> dict:
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for dist_name in ("triton", "megatron-core", "transformer-engine", "transformers", "lhotse"):
        try:
            out[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            out[dist_name] = "not installed"
    from ark_mega.models.specs import te_available

    out["layers"] = ("transformer_engine" if te_available() else
                     "local (Transformer Engine absent: its layers and FP8 are not checked)")
    return out


def run_part(part: Part, out: str, smoke: bool, limit: float) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        p for p in (TOOLS, os.environ.get("PYTHONPATH")) if p))
    if smoke:
        env["TRITON_INTERPRET"] = "1"  # the kernels on the CPU
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled for the GPU
    log_path = os.path.join(out, f"{part.name}.log")
    # an earlier run's result in the same folder must not be reported as this run's
    with contextlib.suppress(FileNotFoundError):
        os.remove(part.result_file(out))
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(part.command(out, smoke), stdout=log, stderr=subprocess.STDOUT,
                                  cwd=ROOT, env=env, timeout=limit)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
    record = {"status": status, "seconds": round(time.perf_counter() - t0, 1)}
    record["figures"] = _figures(part, out)
    if status != "ok":
        with open(log_path, errors="replace") as f:
            record["error"] = "".join(f.readlines()[-15:])
    return record


def _figures(part: Part, out: str) -> dict:
    path = part.result_file(out)
    if not os.path.isfile(path):
        return {}
    if part.name == "kernels":
        suite = ET.parse(path).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    with open(path) as f:
        return json.load(f)


def _met(value, comparison: str, target: float) -> bool:
    return value >= target if comparison == ">=" else value <= target


def targets_of(part: Part, figures: dict, smoke: bool) -> list[str]:
    """The issue's targets for one H100, met or missed (none for a smoke run)."""
    out = []
    if smoke:
        return out
    for key, (comparison, target) in part.targets.items():
        if key in figures and isinstance(figures[key], (int, float)):
            verdict = "met" if _met(figures[key], comparison, target) else "MISSED"
            out.append(f"{key} {comparison} {target}: {verdict}")
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) + ")"
    return str(value)


def write_report(out: str, header: dict, records: dict) -> None:
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump({**header, "parts": records}, f, indent=1, default=str)
    lines = [f"GPU check, {header['date']}, {header['versions']['device']}: "
             f"`{header['command']}`", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()), "",
             "| part | status | s | figures | targets |", "|---|---|---|---|---|"]
    for part in PARTS:
        rec = records.get(part.name)
        if rec is None:
            continue
        figs = rec["figures"]
        shown = "; ".join(f"{k} {_fmt(figs[k])}" for k in SHOWN[part.name] if k in figs)
        lines.append(f"| {part.name} | {rec['status']} | {rec['seconds']} | {shown} | "
                     f"{'; '.join(targets_of(part, figs, header['smoke']))} |")
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the results and the parts' logs")
    ap.add_argument("--only", help="comma-separated part names (default: all, in order)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all parts together")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the harness")
    args = ap.parse_args()
    names = [p.name for p in PARTS]
    chosen = args.only.split(",") if args.only else names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(f"--only: unknown part(s) {unknown}; the parts are {names}", file=sys.stderr)
        return 2
    sys.path.insert(0, ROOT)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU here; --smoke runs the harness on tiny shapes on the CPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    header = {"date": datetime.date.today().isoformat(), "versions": versions(),
              "command": " ".join(["python", "tools/gpu_check.py", *sys.argv[1:]]),
              "smoke": args.smoke}
    for key, val in header["versions"].items():
        print(f"{key:>20}: {val}", flush=True)
    records, end = {}, time.perf_counter() + args.budget
    for part in PARTS:
        if part.name not in chosen:
            continue
        left = end - time.perf_counter()
        if left < 15:
            records[part.name] = {"status": "not run: out of budget", "seconds": 0, "figures": {}}
        else:
            print(f"-- {part.name} (limit {min(part.limit_s, left):.0f} s)", flush=True)
            records[part.name] = run_part(part, args.out, args.smoke, min(part.limit_s, left))
        rec = records[part.name]
        print(f"   {rec['status']} in {rec['seconds']} s; "
              + "; ".join(targets_of(part, rec["figures"], args.smoke)), flush=True)
        if "error" in rec:
            print("   " + rec["error"].replace("\n", "\n   "), flush=True)
        write_report(args.out, header, records)
    failed = [n for n, r in records.items() if r["status"] != "ok"]
    print(f"gpu_check: {len(records) - len(failed)} of {len(records)} parts ok"
          + (f"; not ok: {', '.join(failed)}" if failed else "")
          + f"; {os.path.join(args.out, 'gpu_check.md')}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
