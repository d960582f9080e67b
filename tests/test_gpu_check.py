"""tools/gpu_check.py, the one command that checks a GPU node, run as --smoke: the same harness
and parts on tiny shapes on the CPU."""

import importlib
import json
import os
import re
import subprocess
import sys

import pytest

from ark_mega.models import preset
from conftest import load_tool
from opd_setup import ROOT

SCRIPT = os.path.join(ROOT, "tools", "gpu_check.py")


def test_smoke_runs_every_part_and_writes_its_table(tmp_path):
    # an earlier check in the same folder: its run would be resumed (and fail, being empty)
    os.makedirs(tmp_path / "trainer" / "student_sft" / "checkpoints" / "step_000099")
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["kernels", "bench_kernels", "trainer", "bench_opd", "real_ark",
                           "real_qwen3", "decode", "sft"]
    assert all(p["status"] == "ok" for p in parts.values()), parts
    assert parts["kernels"]["figures"]["tests"] > 0 and parts["kernels"]["figures"]["failures"] == 0
    assert parts["trainer"]["figures"]["passed"] is True
    # the loss head's fused path (the kernels, interpreted) against the naive one
    bench = parts["bench_kernels"]["figures"]
    assert bench["loss_naive"] == pytest.approx(bench["loss_fused"], rel=1e-5)
    assert bench["hidden_grad_rel_diff"] < 1e-5
    assert bench["union_kl_rows"] == 64 and bench["union_kl_gbps"] > 0
    assert bench["union_kl_kernel_gbps"] > 0
    # our OPD loss on a shared rollout equals the authors' way (transformers models with the
    # same weights, full logits, a per-position Python union)
    bench = parts["bench_opd"]["figures"]
    assert bench["losses_agree"] is True
    assert bench["shared_rollout_loss_ours"] == pytest.approx(bench["shared_rollout_loss_baseline"],
                                                              rel=1e-4)
    decode = parts["decode"]["figures"]
    assert decode["decode_tokens_per_s"] > 0
    assert set(decode["variants_ms_per_step"]) == {"one_split_attention", "cublas_mlp",
                                                 "cublas_projections", "run8_step",
                                                 "chunked_pick"}
    assert all(isinstance(ms, float) for ms in decode["variants_ms_per_step"].values())
    # the decoding step's own ops, apart from the prefill: per step, each decoder layer's four
    # projections (QKV with its bias in the matmul) and the output layer
    profile = (tmp_path / "decode.profile.txt").read_text()
    steps = profile[profile.index("per steady decoding step"):].splitlines()
    calls = {line.split()[-1]: float(line.split()[1]) for line in steps
             if line.endswith((" aten::mm", " aten::addmm"))}
    layers = preset("tiny_ark_asr").decoder.num_layers
    assert calls == {"aten::mm": 3 * layers + 1, "aten::addmm": layers}, calls
    assert parts["sft"]["figures"]["model_tflop_per_step"] > 0
    assert {"torch", "triton", "megatron-core", "transformer-engine"} <= set(report["versions"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} | ok |" in table for name in parts)
    assert re.search(r"variants_ms_per_step \(one_split_attention [\d.e-]+, cublas_mlp ", table)


def test_a_failing_part_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import gpu_check

    broken = next(p for p in gpu_check.PARTS if p.name == "trainer")
    monkeypatch.setattr(broken, "command", lambda out, smoke: [
        sys.executable, "-c", "import sys; print('a line before'); sys.exit('trainer broke')"])
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--smoke", "--out", str(tmp_path),
                                      "--only", "trainer,real_ark"])
    stale = tmp_path / "trainer" / "check_trainer.json"  # an earlier check's result
    stale.parent.mkdir()
    stale.write_text(json.dumps({"passed": True}))
    assert gpu_check.main() == 1
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert parts["trainer"]["status"] == "failed (exit 1)"
    assert parts["trainer"]["figures"] == {}
    assert "trainer broke" in parts["trainer"]["error"]
    assert parts["real_ark"]["status"] == "ok"
    assert "| trainer | failed (exit 1) |" in (tmp_path / "gpu_check.md").read_text()


def bench_decode_failing(tmp_path, monkeypatch, target: str, fails) -> tuple[int, dict]:
    """tools/bench_decode.py --smoke in this process with `target` (a function, by its dotted
    name where it is used) raising where `fails(args, kwargs)`: its exit code and figures."""
    module, name = target.rsplit(".", 1)
    real = getattr(importlib.import_module(module), name)

    def failing(*args, **kwargs):
        if fails(args, kwargs):
            raise RuntimeError("failed on purpose")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, failing)
    monkeypatch.syspath_prepend(os.path.dirname(SCRIPT))
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--smoke", "--out",
                                      str(tmp_path / "decode.json")])
    code = load_tool("bench_decode").main()
    return code, json.loads((tmp_path / "decode.json").read_text())


def test_a_decoding_variant_that_fails_is_recorded_and_the_others_still_run(
        single_rank, tmp_path, monkeypatch):
    code, figures = bench_decode_failing(tmp_path, monkeypatch, "ark_mega.opd.generate.vocab_topk",
                                         lambda args, kwargs: args[-1] is not None)  # a chunk
    assert code == 0 and figures["decode_tokens_per_s"] > 0
    timed = figures["variants_ms_per_step"]
    assert timed["chunked_pick"] == "failed: RuntimeError: failed on purpose"
    assert all(isinstance(timed[name], float) for name in ("one_split_attention", "cublas_mlp",
                                                           "cublas_projections", "run8_step"))


def test_default_decoding_kernels_that_fail_still_leave_the_others_timed(
        single_rank, tmp_path, monkeypatch):
    """The default attention (splits None) failing: the run reports its error, exits 1, and
    times the steps with the attention in one part (run 8's too)."""
    code, figures = bench_decode_failing(
        tmp_path, monkeypatch, "ark_mega.models.decode_step.decode_attention",
        lambda args, kwargs: kwargs["splits"] is None)
    assert code == 1 and figures["error"] == "RuntimeError: failed on purpose"
    assert "decode_tokens_per_s" not in figures and figures["floor_tokens_per_s"] > 0
    timed = figures["variants_ms_per_step"]
    assert isinstance(timed["one_split_attention"], float) and isinstance(timed["run8_step"], float)
    assert all(timed[name] == "failed: RuntimeError: failed on purpose"
               for name in ("cublas_mlp", "cublas_projections", "chunked_pick"))


def test_unknown_parts_are_named():
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", "/nonexistent",
                           "--only", "kernels,warp"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown part(s) ['warp']" in proc.stderr
