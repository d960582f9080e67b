"""Timing and the device's own speed limits, for the benchmark scripts in tools/.

Every ratio a benchmark reports is against figures measured in the same run on the same device:
the bandwidth of a device-to-device copy and the throughput of a large bf16 matrix product.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int = 2) -> float:
    """Median milliseconds of fn(): CUDA events via triton's do_bench on a GPU, a plain wall
    clock over `reps` calls on the CPU (where the figure is no performance claim). On a GPU the
    median is over at least 5 calls: do_bench's 200 ms alone would time one call of a step
    that takes longer, and one pause of the host (a garbage collection) would be the figure."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e3
    from triton.testing import do_bench

    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once_ms = (time.perf_counter() - t0) * 1e3
    return do_bench(fn, warmup=25, rep=max(200.0, 6 * once_ms), return_mode="median")


def compiled_graphs() -> int:
    """Graphs torch.compile has built so far in this process. On a GPU megatron's fused
    bias-dropout-add and SwiGLU are compiled, again for each new shape until torch marks the
    changing sizes dynamic: a benchmark whose timed region changes shapes reports how many
    compiles fell inside it."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def peak_mib(fn, device: torch.device) -> float:
    """Peak memory fn() allocates above what is allocated before it (NaN on the CPU)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_gbps(device: torch.device, mib: int = 1024) -> float:
    """Device memory bandwidth of a copy, bytes read + written per second (GB/s)."""
    src = torch.empty(mib * 2**18, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / ms / 1e6


def matmul_tflops(device: torch.device, n: int = 8192, dtype=torch.bfloat16) -> float:
    """Throughput of an n x n x n matrix product on random data (TFLOP/s): the device's
    practical peak for the dtype, the denominator of MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = timed(lambda: a @ b, device)
    return 2 * n ** 3 / ms / 1e9


def _profiled(fn, device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sync(device)
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    return prof.key_averages()


def write_profile(path: str, fn, device: torch.device, rows: int = 30):
    """Where the time of one fn() call goes (torch.profiler): the ops by device time and by
    host time, and the call's wall time against the device's busy time (far below it: the
    host, not the GPU, sets the pace). Returns the profiled events."""
    t0 = time.perf_counter()
    events = _profiled(fn, device)
    wall_ms = (time.perf_counter() - t0) * 1e3
    kernels = [e for e in events if e.device_type.name == "CUDA"]  # not the ops that launch them
    device_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    with open(path, "w") as f:
        f.write(f"wall {wall_ms:.1f} ms (profiled), device busy {device_ms:.1f} ms, "
                f"{sum(e.count for e in kernels)} device ops\n\n")
        if device.type == "cuda":
            f.write("by device time\n")
            f.write(events.table(sort_by="self_device_time_total", row_limit=rows) + "\n")
        f.write("by host time\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=rows) + "\n")
    return events


def write_difference_profile(path: str, longer, shorter, extra: int, device: torch.device,
                             what: str) -> None:
    """Appended to `path`: what `extra` repetitions of something cost, as the kernels of a
    longer call (its profiled events, from `write_profile`) less those of a shorter() one (on
    the CPU its ops, by host time): per repetition each kernel's calls and microseconds, every
    kernel whose calls grew (the counts are exact; a time can come out below zero where the
    shorter call was the noisier). Where the repetitions cannot be run alone (decoding steps
    inside a rollout), this separates them from the rest."""
    def times(events):
        if device.type == "cuda":
            return {e.key: (e.count, e.self_device_time_total) for e in events
                    if e.device_type.name == "CUDA"}
        return {e.key: (e.count, e.self_cpu_time_total) for e in events}

    short_times = times(_profiled(shorter, device))
    per = []
    for name, (calls, us) in times(longer).items():
        short_calls, short_us = short_times.get(name, (0, 0.0))
        if calls > short_calls:
            per.append(((us - short_us) / extra, (calls - short_calls) / extra, name))
    per.sort(reverse=True)
    clock = "device" if device.type == "cuda" else "host"
    with open(path, "a") as f:
        f.write(f"\nper {what} ({clock} time of the longer call less the shorter one, / {extra}): "
                f"{sum(us for us, _, _ in per):.1f} us, {sum(c for _, c, _ in per):.0f} "
                f"{'kernels' if device.type == 'cuda' else 'ops'}\n")
        f.write(f"{'us':>9} {'calls':>6} {'us/call':>8}  name\n")
        for us, calls, name in per:
            f.write(f"{us:9.1f} {calls:6.1f} {us / calls:8.2f}  {name[:100]}\n")


def report(result: dict, out: str | None) -> None:
    """Print a benchmark's figures, one per line; write them as JSON to `out` if given."""
    width = max(map(len, result))
    for key, val in result.items():
        print(f"{key:>{width}}: {val}", flush=True)
    write_json(result, out)


def write_json(result: dict, out: str | None) -> None:
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


def bench_parser(doc: str, utterance: bool = False, profile: bool = True) -> argparse.ArgumentParser:
    """A benchmark's command line: its own options, plus --smoke, --out and (with `profile`)
    --profile; with `utterance`, the model and utterance shape: --preset and --seconds."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if utterance:
        ap.add_argument("--preset", default="ark_asr_0p6b")
        ap.add_argument("--seconds", type=float, default=30.0, help="seconds per utterance")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script")
    if profile:
        ap.add_argument("--profile",
                        help="write where the time of one call goes (torch.profiler) here")
    ap.add_argument("--out", help="write the results as JSON here")
    return ap


def bench_device(smoke: bool) -> tuple[torch.device, torch.dtype] | None:
    """(device, dtype) of a run: CUDA in bf16; the CPU in fp32 for --smoke; None (with the
    reason printed) for a real run without a GPU."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    if smoke:
        return torch.device("cpu"), torch.float32
    print("this benchmark needs a CUDA GPU; --smoke checks the script on the CPU")
    return None
