import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import slurm_cluster

# Without a GPU the Triton kernels run in Triton's interpreter (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test helpers (hf_reference.py, parity.py) are imported by name, in-process and under torchrun.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def single_rank():
    """torch.distributed + megatron parallel state as one process (TP = PP = 1)."""
    from ark_mega.distributed import ParallelConfig, init_parallel

    init_parallel(ParallelConfig())
    yield


@pytest.fixture
def host_reads(monkeypatch):
    """The names of the tensor methods that read values on the host, appended as they are
    called (on a GPU each such read waits for the device)."""
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        method = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _m=method, _n=name, **k:
                            reads.append(_n) or _m(self, *a, **k))
    return reads


def load_tool(name: str):
    """tools/<name>.py as a module, to call its functions in-process (a subprocess would pay the
    imports each time)."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun(script: str, *args: str, nproc: int = 2) -> list[dict]:
    """Run tests/<script> under torchrun (CPU and gloo; NCCL on a GPU machine, which needs a GPU
    per process); return the JSON lines it printed."""
    if torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        pytest.skip(f"{nproc} processes need {nproc} GPUs here (NCCL), this machine has "
                    f"{torch.cuda.device_count()}")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(port), os.path.join(os.path.dirname(__file__), script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def pytest_terminal_summary(terminalreporter):
    """How many SLURM tests ran: they skip without the SLURM packages, and CI should show it."""
    counts = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if "test_slurm.py" in getattr(report, "nodeid", "") and report.when in ("call", "setup"):
                if outcome != "passed" or report.when == "call":
                    counts[outcome] = counts.get(outcome, 0) + 1
    if counts:
        why = terminalreporter.config.stash.get(slurm_cluster.ONE_NODE_PREEMPTION, None)
        terminalreporter.write_line(
            "SLURM tests: " + ", ".join(f"{n} {k}" for k, n in counts.items())
            + (f" (the preemption ran on one node: no two-node cluster, {why})" if why else ""))
