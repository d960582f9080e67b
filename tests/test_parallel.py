"""TP = 2 and PP = 2 over gloo (two CPU processes): parity with transformers for both models on
padded and packed input, and training steps of the tiny student (tests/dist_checks.py)."""

import pytest

from conftest import torchrun


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parity_and_training(tp, pp):
    records = torchrun("dist_checks.py", "--tp", str(tp), "--pp", str(pp))
    parity = [r for r in records if r["check"] == "parity"]
    assert {r["model"] for r in parity} == {"tiny_ark_asr", "tiny_qwen3_asr"}
    for r in parity:
        assert set(r["errors"]) == {"padded", "packed"}
        assert all(e <= 1e-4 for e in r["errors"].values()), r
    (train,) = [r for r in records if r["check"] == "train"]
    losses = train["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert train["tied_copies_equal"]


def test_generation_at_tp2_equals_recomputation_also_with_fewer_kv_heads_than_ranks():
    records = torchrun("dist_generate.py")
    assert [r["kv_heads"] for r in records] == [2, 1]
    for r in records:
        assert r["tokens"] == r["recomputed"], r
        assert any(r["tokens"]) and len({tuple(t) for t in r["tokens"]}) > 1, r
