"""A resumed run whose LR schedule or Adam betas differ from its checkpoint's (optim.on_resume):
by default refused before anything is loaded, else the checkpoint's or the config's settings. A
run with the other kind of optimizer (optim.distributed) is refused."""

import json
import math
import os
import shutil

import pytest
import torch

from ark_mega.config import load_config
from test_trainer import run_overrides, tok_file  # noqa: F401 (fixture)

COSINE = {"optim.schedule": "cosine", "optim.lr": 1e-3, "optim.min_lr": 1e-4,
          "optim.warmup_steps": 1}


def trainer(tmp_path, tok, out, steps, **extra):
    from ark_mega.opd.trainer import Trainer

    return Trainer(load_config(None, run_overrides(tmp_path, tok, out, steps=steps,
                                                   **{**COSINE, **extra})))


def lrs(out):
    """{step: the LR the scheduler set after it} as the run logged it."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["lr"] for r in map(json.loads, f)}


def used_by_steps(t, monkeypatch, read=lambda groups: groups[0]["lr"]):
    """What `read` finds in the optimizer's param groups as each step of trainer `t` runs (by
    default the LR), appended as it runs."""
    from ark_mega.opd import trainer as trainer_module

    used, sft_step = [], trainer_module.sft_step
    monkeypatch.setattr(trainer_module, "sft_step", lambda *a, **k: used.append(
        read(t.optimizer.param_groups)) or sft_step(*a, **k))
    return used


def cosine(step, steps, lr, min_lr=1e-4, warmup=1):
    done = (step - warmup) / (steps - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * done))


@pytest.fixture(scope="module")
def saved(single_rank, tmp_path_factory, tok_file):
    """A finished 4-step cosine run (its last checkpoint at step 4), by optim.distributed."""
    runs = {}

    def get(distributed):
        if distributed not in runs:
            root = tmp_path_factory.mktemp("saved")
            trainer(root, tok_file, root / "run", 4, **{"optim.distributed": distributed}).run()
            runs[distributed] = root / "run"
        return runs[distributed]
    return get


@pytest.fixture
def resumed(saved, tmp_path, tok_file):
    """A copy of the saved run, resumed for 8 steps with `extra` settings."""
    def resume(**extra):
        out = tmp_path / "run"
        shutil.copytree(saved(extra.get("optim.distributed", False)), out)
        return trainer(tmp_path, tok_file, out, 8, **extra)
    return resume


def test_by_default_a_changed_schedule_is_refused_before_anything_loads(resumed):
    t = resumed(**{"optim.lr": 2e-3})
    before = [p.detach().clone() for p in t.student.parameters()]
    with pytest.raises(ValueError, match=r"other optimizer settings: the checkpoint has optim.lr "
                       r"0.001 \(config 0.002\), steps 4 \(config 8\); set optim."
                       r"on_resume=config .* or optim.on_resume=checkpoint"):
        t.run()
    assert all(torch.equal(p, q) for p, q in zip(t.student.parameters(), before))
    assert t.scheduler.num_steps == 0


@pytest.mark.parametrize("distributed", [False, True])
def test_config_follows_the_new_decay_from_the_resumed_step(resumed, tmp_path, tok_file, capsys,
                                                            monkeypatch, distributed):
    """Also with megatron's distributed optimizer (which rebuilds its param groups at load)."""
    new = {"optim.lr": 2e-3, "optim.distributed": distributed}
    t = resumed(**new, **{"optim.on_resume": "config"})
    used = used_by_steps(t, monkeypatch)
    t.run()
    monkeypatch.undo()  # the fresh run's steps are not recorded
    assert "resuming with the config's optimizer settings" in capsys.readouterr().out
    trainer(tmp_path, tok_file, tmp_path / "fresh", 8, **new).run()
    fresh = lrs(tmp_path / "fresh")
    assert used == [fresh[s] for s in range(4, 8)]  # steps 5-8 run with the LR set after 4-7
    assert used[2] == pytest.approx(cosine(6, 8, 2e-3), rel=1e-9)
    assert [lrs(tmp_path / "run")[s] for s in range(5, 9)] == [fresh[s] for s in range(5, 9)]


def test_checkpoint_keeps_the_old_decay(resumed, tmp_path, capsys):
    resumed(**{"optim.lr": 2e-3, "optim.on_resume": "checkpoint"}).run()
    assert "resuming with the checkpoint's optimizer settings" in capsys.readouterr().out
    got = lrs(tmp_path / "run")
    assert got.keys() == set(range(1, 9))
    assert got[2] == pytest.approx(cosine(2, 4, 1e-3), rel=1e-9)
    assert [got[s] for s in range(5, 9)] == [pytest.approx(1e-4)] * 4  # the old decay ended


@pytest.mark.parametrize("mode,distributed", [("check", False), ("checkpoint", False),
                                              ("config", False), ("check", True),
                                              ("config", True)])
def test_adam_betas_are_refused_kept_or_replaced_as_the_setting_says(resumed, mode, distributed):
    t = resumed(**{"optim.adam_beta2": 0.99, "optim.distributed": distributed,
                   "optim.on_resume": mode})
    if mode == "check":
        with pytest.raises(ValueError, match=r"\(optim.adam_beta1, optim.adam_beta2\) \(0.9, "
                                             r"0.999\) \(config \(0.9, 0.99\)\)"):
            t.run()
        return
    t.run()
    want = (0.9, 0.999) if mode == "checkpoint" else (0.9, 0.99)
    assert {tuple(g["betas"]) for g in t.optimizer.param_groups} == {want}


def test_checkpoint_keeps_its_weight_decay_from_the_first_resumed_step(resumed, monkeypatch):
    """megatron's scheduler load steps before it reads the saved weight decay."""
    t = resumed(**{"optim.weight_decay": 0.1, "optim.on_resume": "checkpoint"})
    used = used_by_steps(t, monkeypatch, lambda groups: max(g["weight_decay"] for g in groups))
    t.run()
    assert used == [0.0] * 4  # the saved run's (run_overrides)


def test_an_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="optim.on_resume must be check, checkpoint or "
                                         "config, got 'keep'"):
        load_config(None, ["optim.on_resume=keep"])


def test_a_checkpoint_resumes_only_with_the_optimizer_kind_that_saved_it(saved, tmp_path,
                                                                         tok_file):
    out = tmp_path / "run"
    shutil.copytree(saved(False), out)
    with pytest.raises(ValueError, match=r"saved with megatron's distributed optimizer off, this "
                                         r"run has it on \(optim.distributed; .*\): resume with "
                                         r"the same, or start a new output_dir"):
        trainer(tmp_path, tok_file, out, 4, **{"optim.distributed": True}).run()
