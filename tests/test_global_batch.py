"""One global, token-level loss over micro-batches and data-parallel ranks (SFT's
cross-entropy and OPD's Eq. 1 divide by the positions of the whole global batch): the same
utterances give the same loss and gradients however they are split."""

import pytest
import torch

from ark_mega import checkpoint
from ark_mega.config import load_config
from conftest import torchrun
from global_batch import LAYOUTS, WHOLE, gradients, initial_student, run_step


def assert_same_gradients(got: dict, want: dict, tol=1e-5):
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().clamp(min=1e-8)
        assert (got[name] - want[name]).abs().max() / scale < tol, name


@pytest.mark.parametrize("stage", ["sft", "opd"])
def test_micro_batches_give_the_update_of_one_batch_holding_them(single_rank, stage):
    student, one = run_step(stage, WHOLE)
    want = gradients(student)
    student, two = run_step(stage, [(0, 1), (1, 3)])  # uneven halves
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two.get("tokens", two.get("positions")) == one.get("tokens", one.get("positions"))
    assert_same_gradients(gradients(student), want)


@pytest.mark.parametrize("layout,stages", [("dp", ["sft", "opd"]), ("pp", ["sft"]),
                                           ("dp_one_empty", ["opd"])])
def test_layout_gives_the_loss_and_gradients_of_one_process(single_rank, tmp_path, layout, stages):
    """DP = 2 with 1 and 3 utterances per rank against one process with all 4 in one
    micro-batch; PP = 2 with four micro-batches against PP = 1 with the same four; DP = 2 with
    every rollout of one rank empty (it takes part in every collective of the step, and
    reports the global loss) against one process with the other rank's utterance."""
    init = str(tmp_path / "init")
    checkpoint.save(init, 0, initial_student()[0])
    records = torchrun("dist_global_batch.py", "--layout", layout, "--stages", ",".join(stages),
                       "--init", init, "--out", str(tmp_path / "grads"))
    assert [r["stage"] for r in records] == stages
    reference = WHOLE if layout == "dp" else LAYOUTS[layout]["split"][-1]
    for stage, record in zip(stages, records):
        student, want = one_thread(run_step, stage, reference)
        assert record["loss"] == pytest.approx(want["loss"], rel=1e-5)
        count = "tokens" if stage == "sft" else "positions"
        assert record[count] == want[count]
        loaded = initial_student()[0]
        checkpoint.load(str(tmp_path / "grads" / stage), loaded)
        assert_same_gradients({n: p.detach() for n, p in loaded.named_parameters()},
                              gradients(student))


def one_thread(fn, *args):
    """fn(*args) on one CPU thread, as the torchrun processes run (OMP_NUM_THREADS=1): the
    convolutions' gradients are summed in another order on two threads (4e-5 of the largest)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)
