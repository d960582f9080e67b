"""Activation recomputation changes memory, not results: the same loss and gradients (fp32)."""

import pytest
import torch

from ark_mega.data import PromptBuilder
from opd_setup import batch, model, tokenizer


def loss_and_grads(m, b):
    """Loss, gradients and the bytes autograd saved for backward."""
    m.zero_grad()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        logits = m(b.input_ids, b.audio_features, b.cu_seqlens)[:, 0].float()  # [T, V]
        labels, mask = b.labels[0], b.loss_mask[0]
        loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return loss.item(), grads, sum(saved)


@pytest.mark.parametrize("recompute,encoder", [("selective", False), ("full", False),
                                               ("full", True)])
def test_recomputation_gives_the_same_loss_and_gradients(single_rank, recompute, encoder):
    prompts = PromptBuilder.student(tokenizer())
    b = batch(prompts, n=3)
    plain = model("tiny_ark_asr", prompts, seed=0)
    again = model("tiny_ark_asr", prompts, seed=0, recompute=recompute, recompute_encoder=encoder)
    again.load_state_dict(plain.state_dict())
    assert again.gpt.decoder.config.recompute_granularity == recompute
    assert (again.encoder.block.config.recompute_granularity == "full") == encoder
    want, want_grads, want_saved = loss_and_grads(plain, b)
    got, got_grads, got_saved = loss_and_grads(again, b)
    assert got_saved < want_saved  # it recomputes
    assert got == pytest.approx(want, rel=1e-6)
    assert want_grads.keys() == got_grads.keys()
    for name, g in want_grads.items():
        assert torch.allclose(got_grads[name], g, rtol=1e-5, atol=1e-7), name


def test_unknown_recompute_is_an_error():
    from ark_mega.models.megatron_config import _recompute

    with pytest.raises(ValueError, match="recompute must be one of"):
        _recompute("some")


def test_memory_benchmark_script_runs(tmp_path):
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "memory.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "tools/bench_memory.py", "--smoke", "--out", str(out)],
                   check=True, capture_output=True, cwd=root)
    result = json.loads(out.read_text())
    none, full = result["none"], result["full"]
    assert none["decoder_mib_per_token"] > 0 and none["loss_head_mib_per_token"] > 0
    assert full["total_mib_per_token"] < none["total_mib_per_token"]
    subprocess.run([sys.executable, "tools/bench_memory.py", "--smoke", "--transients", "--out",
                    str(out)], check=True, capture_output=True, cwd=root)
    found = json.loads(out.read_text())["transients"]
    largest = found["largest"]
    assert largest and largest[0]["mib"] >= largest[-1]["mib"] > 0
    rollout = found["rollout"]  # prefill's logits at the last position only: b rows of V
    assert rollout["largest_logits"][0]["shape"][0] == rollout["utterances"]
