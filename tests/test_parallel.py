"""TP = 2 and PP = 2 over gloo (two CPU processes): parity with transformers for both models on
padded and packed input, and training steps of the tiny student (tests/dist_checks.py)."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


def run_dist_checks(tp: int, pp: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + 10 * tp + pp), os.path.join(HERE, "dist_checks.py"),
           "--tp", str(tp), "--pp", str(pp)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return records


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parity_and_training(tp, pp):
    records = run_dist_checks(tp, pp)
    parity = [r for r in records if r["check"] == "parity"]
    assert {r["model"] for r in parity} == {"tiny_ark_asr", "tiny_qwen3_asr"}
    for r in parity:
        assert set(r["errors"]) == {"padded", "packed"}
        assert all(e <= 1e-4 for e in r["errors"].values()), r
    (train,) = [r for r in records if r["check"] == "train"]
    losses = train["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert train["tied_copies_equal"]
