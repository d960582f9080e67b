"""The trainer: OPD steps at TP = 2 and PP = 2, checkpoints across layouts, bitwise resume,
the TD and OPD stages end to end, non-finite losses, and the run configuration."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from ark_mega import checkpoint
from ark_mega.config import load_config
from ark_mega.data import PromptBuilder
from conftest import torchrun
from opd_setup import ROOT, VOCAB, batch, model, opd_step, tokenizer


def test_opd_step_at_tp2_equals_tp1_and_its_checkpoint_loads_at_tp1(single_rank, tmp_path):
    (record,) = torchrun("dist_opd.py", "--tp", "2", "--save", str(tmp_path))
    assert record["ok"], record
    # the same step at TP = 1 (CPU initialisation is the same at every TP size)
    sp = PromptBuilder.student(tokenizer())
    student = model("tiny_ark_asr", sp, seed=0, scale=3.0)
    step, sp, _ = opd_step(student)
    metrics = step([batch(sp)])
    assert metrics["loss"] == pytest.approx(record["loss"], rel=1e-4)
    assert metrics["positions"] == record["positions"]
    # the TP = 2 checkpoint at TP = 1 gives the same logits
    fresh = model("tiny_ark_asr", sp, seed=123)
    checkpoint.load(str(tmp_path), fresh)
    ids = torch.arange(3, 40)[None] % 250
    with torch.no_grad():
        logits = fresh.eval()(ids, None, torch.tensor([0, ids.shape[1]]))
    saved = torch.load(tmp_path / "logits.pt")
    assert (logits - saved).abs().max() <= 1e-5 * saved.abs().max()


def test_opd_step_at_pp2_equals_pp1(single_rank, tmp_path):
    """Rollouts decoded across two pipeline stages (hidden states sent stage to stage at every
    step) give the single-stage step's loss on the same weights (the PP = 2 checkpoint)."""
    (record,) = torchrun("dist_opd.py", "--pp", "2", "--save", str(tmp_path))
    assert record["ok"] and record["positions"] > 0, record
    sp = PromptBuilder.student(tokenizer())
    student = model("tiny_ark_asr", sp, seed=123)
    checkpoint.load(str(tmp_path), student)
    step, sp, teacher = opd_step(student)
    checkpoint.load(str(tmp_path / "teacher"), teacher)  # PP = 2 initialises stages apart
    metrics = step([batch(sp)])
    assert metrics["loss"] == pytest.approx(record["loss"], rel=1e-4)
    assert metrics["positions"] == record["positions"]


def test_a_checkpoint_of_another_model_is_named_with_what_differs(single_rank, tmp_path):
    from ark_mega.models import AudioLM

    sp = PromptBuilder.student(tokenizer())
    checkpoint.save(str(tmp_path / "qwen3"), 1, model("tiny_qwen3_asr", sp, seed=0))
    student = model("tiny_ark_asr", sp, seed=0)
    with pytest.raises(ValueError, match=r"qwen3.step_000001 does not match the model it is "
                       r"loaded into: it holds a model of family qwen3_asr, and lacks \d+ of the model's "
                       r"tensors, e.g. encoder.conv1.weight"):
        checkpoint.load(str(tmp_path / "qwen3"), student)
    checkpoint.save(str(tmp_path / "ark"), 1, student)
    cfg = student.cfg
    cfg.decoder.vocab_size = VOCAB + 16
    with pytest.raises(ValueError, match=rf"family ark_asr, and holds at another shape 1 "
                       rf"of the model's tensors, e.g. gpt.embedding.word_embeddings.weight "
                       rf"\({VOCAB}, \d+\) \(model \({VOCAB + 16}, \d+\)\)"):
        checkpoint.load(str(tmp_path / "ark"), AudioLM(cfg))


def small_manifest(tmp_path, n, split="train"):
    src = os.path.join(ROOT, "examples", "data", f"{split}.jsonl")
    rows = [json.loads(line) for line in open(src, encoding="utf-8")]
    rows = rows[: n // 2] + rows[-(n - n // 2):]  # English first in the file, Mandarin last
    path = tmp_path / f"{split}_{n}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            r["audio"] = os.path.join(ROOT, "examples", "data", r["audio"])
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def run_overrides(tmp_path, tok, out, **extra):
    base = {
        "stage": "sft", "output_dir": str(out), "student.preset": "tiny_ark_asr",
        "student.tokenizer": tok,
        "student.overrides": {"decoder.vocab_size": VOCAB, "encoder.num_mel_bins": 128},
        "data.train": small_manifest(tmp_path, 24), "data.heldout": small_manifest(tmp_path, 6, "heldout"),
        "data.max_tokens": 1200, "data.num_workers": 0, "optim.lr": 1e-3, "optim.weight_decay": 0.0,
        "save_every": 2, "keep_last": 2, "log_every": 1,
    }
    base.update(extra)
    return [f"{k}={json.dumps(v)}" for k, v in base.items()]


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer().save(str(path))
    return str(path)


def tensorboard_steps(out, tag):
    """The steps of a scalar as TensorBoard shows them (events past a resume's purge step that
    an earlier run wrote are dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), purge_orphaned_data=True)
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture
def fused_adamw_calls(monkeypatch):
    """One entry per call of torch's fused AdamW kernel."""
    calls = []
    fused_adamw = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or
                        fused_adamw(*a, **k))
    return calls


@pytest.mark.parametrize("dtype,gpu_optimizer,micro", [("fp32", False, 1), ("bf16", True, 1),
                                                       ("fp32", False, 2)])
def test_resume_continues_bitwise(single_rank, tmp_path, tok_file, dtype, gpu_optimizer, micro,
                                  fused_adamw_calls):
    """Also in bf16 with the GPU's optimizer: megatron's distributed optimizer (its checkpoint
    format, its fresh state at load, torch Adam's step) running torch's fused AdamW; and with
    two micro-batches a step (the data position counts micro-batches; 5 steps cross an epoch)."""
    from ark_mega.opd.trainer import Trainer

    def run(out, steps):
        Trainer(load_config(None, run_overrides(tmp_path, tok_file, tmp_path / out, steps=steps,
                                                dtype=dtype, **{"optim.distributed": gpu_optimizer,
                                                                "optim.fused": gpu_optimizer,
                                                                "data.micro_batches": micro}))).run()

    run("a", 5)
    run("b", 3)
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(tmp_path / "b" / "checkpoints")] \
        == ["step_000002", "step_000003"]  # keep_last = 2
    # "killed" after logging step 3, before its checkpoint was complete: the restarted run
    # resumes from step 2's checkpoint and logs steps 3-5, each step once
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_000003")
    run("b", 5)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5]
    assert tensorboard_steps(tmp_path / "b", "run/loss") == [1, 2, 3, 4, 5]  # step 3 purged once
    assert [a[s] for s in (3, 4, 5)] == [b[s] for s in (3, 4, 5)]  # bitwise equal
    assert a[5] < a[1]
    assert bool(fused_adamw_calls) == gpu_optimizer


@pytest.mark.parametrize("saved,resumed", [(False, True), (True, False)])
def test_a_resumed_run_computes_adam_as_configured(single_rank, tmp_path, tok_file,
                                                   fused_adamw_calls, saved, resumed):
    """torch takes `fused` / `foreach` from a checkpoint's param groups like hyperparameters: a
    run resumed with another optim.fused must still run the form it is configured with."""
    from ark_mega.opd.trainer import Trainer

    def trainer(steps, fused):
        return Trainer(load_config(None, run_overrides(
            tmp_path, tok_file, tmp_path / "run", steps=steps, dtype="bf16",
            **{"optim.distributed": True, "optim.fused": fused})))

    trainer(2, saved).run()
    fused_adamw_calls.clear()  # the resumed run's calls only
    resumed_run = trainer(4, resumed)
    resumed_run.run()
    groups = resumed_run.optimizer.chained_optimizers[0].optimizer.param_groups
    assert [bool(g["fused"]) for g in groups] == [resumed] * len(groups)
    assert bool(fused_adamw_calls) == resumed
    assert losses(tmp_path / "run").keys() == {1, 2, 3, 4}


def test_td_then_opd_stages(single_rank, tmp_path, tok_file):
    from ark_mega.opd.trainer import Trainer

    tp = PromptBuilder.teacher(tokenizer())
    teacher = model("tiny_qwen3_asr", tp, seed=1, scale=3.0)  # random, but never silent
    checkpoint.save(str(tmp_path / "teacher"), 1, teacher)
    teacher_cfg = {"teacher.preset": "tiny_qwen3_asr", "teacher.checkpoint": str(tmp_path / "teacher"),
                   "teacher.overrides": {"decoder.vocab_size": VOCAB, "encoder.num_mel_bins": 128},
                   "opd.top_k": 8, "opd.generation.max_new_tokens": 8, "opd.generation.top_k": 8}
    td_manifest = tmp_path / "td.jsonl"
    # TD with joint CTC training (its head then meets OPD's model, which has none), on half of
    # the 24 train utterances: the teacher transcribes those only
    td = Trainer(load_config(None, run_overrides(tmp_path, tok_file, tmp_path / "td", stage="td", steps=2,
                                                 td_manifest=str(td_manifest), **teacher_cfg,
                                                 **{"data.subset": 0.5, "sft.ctc_weight": 0.3})))
    assert "ctc_loss" in td.run()
    rows = [json.loads(line) for line in open(td_manifest, encoding="utf-8")]
    assert 0 < len(rows) <= 12 and all(r["text"] for r in rows)
    assert all(r["source"]["teacher"] == str(tmp_path / "teacher") and r["source"]["reference"]
               for r in rows)
    opd = Trainer(load_config(None, run_overrides(
        tmp_path, tok_file, tmp_path / "opd", stage="opd", steps=2,
        **{"student.checkpoint": str(tmp_path / "td" / "checkpoints")}, **teacher_cfg)))
    last = opd.run()
    assert torch.isfinite(torch.tensor(last["loss"])) and last["vuss"] > 1
    assert {"rollout_nonempty", "fallbacks", "mismatch", "rollout_len", "tokens_per_s",
            "time_rollout", "time_teacher", "time_student", "memory_gib", "teacher_mass",
            "top1_agree", "kl_p50", "kl_p90", "kl_max"} <= set(last)
    assert 0 < last["teacher_mass"] <= 1 + 1e-6 and 0 <= last["top1_agree"] <= 1
    assert 0 <= last["kl_p50"] <= last["kl_p90"] <= last["kl_max"]
    rates = opd.evaluate()
    assert set(rates) == {"cer_zh", "wer_en"}


def test_nonfinite_losses_skip_the_step_then_stop(single_rank, tmp_path, tok_file, monkeypatch):
    from ark_mega.opd import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "sft_step", lambda model, batch, ctc=None: {"loss": float("nan")})
    t = trainer_module.Trainer(load_config(None, run_overrides(
        tmp_path, tok_file, tmp_path / "nan", steps=10, max_nonfinite_in_a_row=3)))
    before = [p.detach().clone() for p in t.student.parameters()]
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        t.run()
    assert all(torch.equal(p, q) for p, q in zip(t.student.parameters(), before))


def test_a_step_that_scored_nothing_changes_no_weight(single_rank, tmp_path, tok_file, monkeypatch):
    """As when every OPD rollout of the global batch is empty: no loss, a counted skip, no
    optimizer step (Adam's moments would still move the weights)."""
    from ark_mega.opd import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "sft_step", lambda model, batch, ctc=None: {"positions": 0})
    t = trainer_module.Trainer(load_config(None, run_overrides(
        tmp_path, tok_file, tmp_path / "empty", steps=2)))
    before = [p.detach().clone() for p in t.student.parameters()]
    assert t.run()["skipped_empty"] == 1
    assert all(torch.equal(p, q) for p, q in zip(t.student.parameters(), before))


def test_config_errors_name_the_key():
    with pytest.raises(KeyError, match="'optim.lrr'"):
        load_config(None, ["stage=sft", "optim.lrr=1"])
    with pytest.raises(TypeError, match="config steps"):
        load_config(None, ["stage=sft", "steps=many"])
    with pytest.raises(ValueError, match="optim.min_lr \\(0.1\\) is above optim.lr"):
        load_config(None, ["stage=sft", "optim.lr=0.01", "optim.min_lr=0.1"])
    with pytest.raises(ValueError, match="needs a teacher"):
        load_config(None, ["stage=opd"])
    with pytest.raises(ValueError, match="parallel.tensor_parallel must be an integer of at least 1"):
        load_config(None, ["stage=sft", "parallel.tensor_parallel=0"])
    with pytest.raises(ValueError, match="keep_best .* needs eval_every >= 1"):
        load_config(None, ["stage=sft", "data.heldout=h.jsonl", "keep_best=true"])
    # one distillation width: the rollout's top-k follows opd.top_k, and may not differ from it
    assert load_config(None, ["stage=sft", "opd.top_k=8"]).opd.generation.top_k == 8
    with pytest.raises(ValueError, match=r"opd.generation.top_k \(16\) differs from opd.top_k \(8\)"):
        load_config(None, ["stage=sft", "opd.top_k=8", "opd.generation.top_k=16"])
    cfg = load_config(os.path.join(ROOT, "examples", "configs", "ark_asr_opd.yaml"),
                      ["optim.lr=2e-6", "parallel.tensor_parallel=2"])
    assert cfg.optim.lr == 2e-6 and cfg.parallel.tensor_parallel == 2 and cfg.opd.top_k == 32


def test_model_overrides_take_the_field_type_or_name_the_field(single_rank, tok_file):
    from ark_mega.config import ModelConfig
    from ark_mega.factory import build_model

    base = {"decoder.vocab_size": VOCAB, "encoder.num_mel_bins": 128}
    # YAML reads 1e-05 (no dot) as a string: a float field takes it as the float
    m, _ = build_model(ModelConfig("tiny_ark_asr", {**base, "encoder.layernorm_eps": "1e-05"},
                                   tokenizer=tok_file), torch.float32)
    assert m.cfg.encoder.layernorm_eps == 1e-5
    # the command line's student.overrides.decoder.num_layers=2 nests: the same field
    cfg = load_config(None, ["stage=sft", "student.preset=tiny_ark_asr", f"student.tokenizer={tok_file}",
                             f"student.overrides={json.dumps(base)}", "student.overrides.decoder.num_layers=1"])
    m, _ = build_model(cfg.student, torch.float32)
    assert m.cfg.decoder.num_layers == 1 and m.cfg.decoder.vocab_size == VOCAB
    with pytest.raises(KeyError, match="model override 'decoder.layers'"):
        build_model(ModelConfig("tiny_ark_asr", {**base, "decoder": {"layers": 1}},
                                tokenizer=tok_file), torch.float32)
    with pytest.raises(TypeError, match="model override decoder.num_layers"):
        build_model(ModelConfig("tiny_ark_asr", {**base, "decoder.num_layers": "two"},
                                tokenizer=tok_file), torch.float32)


def test_inputs_are_checked_before_the_first_step(single_rank, tmp_path, tok_file, monkeypatch):
    from ark_mega.opd import trainer as trainer_module

    def cfg(**extra):
        return load_config(None, run_overrides(tmp_path, tok_file, tmp_path / "run", steps=2, **extra))

    with pytest.raises(FileNotFoundError, match="data.heldout: .*nowhere.jsonl does not exist"):
        trainer_module.Trainer(cfg(**{"data.heldout": str(tmp_path / "nowhere.jsonl")}))
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="output_dir: cannot write to"):
        trainer_module.Trainer(cfg(output_dir=str(tmp_path / "file" / "run")))
    monkeypatch.setattr(trainer_module.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match="has 0.0 GiB free, one checkpoint needs about"):
        trainer_module.Trainer(cfg())


def test_run_config_paths_are_relative_to_the_callers_folder(tmp_path, tok_file):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tree = {}
    for item in run_overrides(tmp_path, tok_file, "out", steps=1, eval_every=0,
                              **{"data.heldout": None}):  # no end-of-run transcription
        key, value = item.split("=", 1)
        *sections, last = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = json.loads(value)
    (elsewhere / "my.yaml").write_text(yaml.safe_dump(tree))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_opd.py"),
                           "--config", "my.yaml"], cwd=elsewhere, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (elsewhere / "out" / "checkpoints" / "step_000001").is_dir()


def test_a_rank_killed_during_a_save_resumes_from_the_last_complete_checkpoint(tmp_path, tok_file):
    import signal

    def launch(out, *extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        overrides = run_overrides(tmp_path, tok_file, out, steps=6, save_every=2, keep_last=2,
                                  **{"data.max_tokens": 600})
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_port", str(port), os.path.join(ROOT, "tests", "dist_train.py"), *extra,
             *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"))

    run = launch(tmp_path / "killed", "--hold-save", "4")
    for line in run.stdout:  # rank 1 waits inside the save of step 4
        if line.startswith("HOLD"):
            os.kill(int(line.split()[1]), signal.SIGKILL)
            break
    assert run.wait(timeout=120) != 0
    ckpts = tmp_path / "killed" / "checkpoints"
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(ckpts)] == ["step_000002"]
    uninterrupted = losses(tmp_path / "killed")  # steps 1-4 ran before the save of step 4
    assert sorted(uninterrupted) == [1, 2, 3, 4]
    again = launch(tmp_path / "killed")
    assert again.wait(timeout=600) == 0, again.stdout.read()[-3000:]
    with open(tmp_path / "killed" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]
    resumed = losses(tmp_path / "killed")  # steps 3 and 4 again, from step 2's checkpoint
    assert {s: resumed[s] for s in uninterrupted} == uninterrupted  # bitwise
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(ckpts)] == ["step_000004", "step_000006"]


def _mount_tmpfs(path, size_kib: int, remount: bool = False) -> bool:
    opts = f"{'remount,' if remount else ''}size={size_kib}k"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                          capture_output=True, text=True)
    return proc.returncode == 0


def test_a_full_disk_during_a_save_names_the_path_and_the_run_resumes(single_rank, tmp_path, tok_file):
    from ark_mega.opd.trainer import Trainer

    def run(out, steps):
        Trainer(load_config(None, run_overrides(tmp_path, tok_file, out, steps=steps,
                                                keep_last=1))).run()

    run(tmp_path / "whole", 4)  # uninterrupted, for the losses; its checkpoint's size
    ckpt = tmp_path / "whole" / "checkpoints" / "step_000004"
    size_kib = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) // 1024
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount_tmpfs(disk, int(size_kib * 1.6) + 256):
        pytest.skip("cannot mount a tmpfs here (needs root) to fill a disk")
    try:
        # room for the first checkpoint (step 2), not for the second beside it (keep_last
        # removes the old one only once the new one is complete)
        # the message gives the checkpoint, the cause and the space left. The cause is the
        # first write to fail: an OS error ("No space left on device") or, when torch's zip
        # writer in one of megatron's writer processes fails first, its RuntimeError
        # ("unexpected pos"); which one comes first varies from run to run.
        with pytest.raises(OSError, match=f"saving checkpoint {disk}/out/checkpoints/step_000004 "
                                          r"failed: \S.* \([0-9.]+ MiB free on that disk\)"):
            run(disk / "out", 4)
        assert [os.path.basename(p) for p in checkpoint.list_checkpoints(disk / "out" / "checkpoints")] \
            == ["step_000002"]
        assert not list((disk / "out" / "checkpoints").glob("*.tmp"))
        assert _mount_tmpfs(disk, size_kib * 4, remount=True)  # space freed
        run(disk / "out", 4)
        with open(disk / "out" / "metrics.jsonl") as f:
            assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
        assert losses(disk / "out") == losses(tmp_path / "whole")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)  # files may be open


def test_unfinished_saves_are_never_taken_for_checkpoints(tmp_path):
    (tmp_path / "step_000004").mkdir()
    (tmp_path / "step_000004" / "metadata.json").write_text("{}")
    (tmp_path / "step_000006.tmp").mkdir()  # a save that crashed before its rename
    assert checkpoint.latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_000004")
    assert checkpoint.resolve(str(tmp_path)) == str(tmp_path / "step_000004")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.resolve(str(tmp_path / "step_000006.tmp"))


def test_a_metrics_line_cut_short_by_a_kill_does_not_block_the_resume(tmp_path):
    from ark_mega.metrics_log import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    _truncate_metrics(str(path), 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    path.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a metrics record"):
        _truncate_metrics(str(path), 2)


def test_checkpoints_are_ordered_by_step_past_six_digits(tmp_path):
    for step in (999_999, 1_000_000, 1_000_001):
        (tmp_path / f"step_{step:06d}").mkdir()
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))] \
        == ["step_999999", "step_1000000", "step_1000001"]


def test_a_run_without_resume_refuses_a_folder_holding_checkpoints(single_rank, tmp_path, tok_file):
    """Its own first checkpoints would sort before the old ones, and keep_last deleted them."""
    from ark_mega.opd.trainer import Trainer

    out = tmp_path / "again"
    Trainer(load_config(None, run_overrides(tmp_path, tok_file, out, steps=2))).run()
    with pytest.raises(ValueError, match="resume is off but .* holds checkpoints"):
        Trainer(load_config(None, run_overrides(tmp_path, tok_file, out, steps=2,
                                                resume=False))).run()


def test_a_preemption_notice_after_a_save_leaves_the_next_save_working(single_rank, tmp_path):
    """SLURM sends USR1 to every process of the job step, also to the helper processes
    megatron's checkpoint writer started at the first save: the save the notice asks for must
    still work, and the trainer's handler still runs."""
    import signal
    import time

    import psutil

    sp = PromptBuilder.student(tokenizer())
    student = model("tiny_ark_asr", sp, seed=0)
    notices = []
    before = signal.signal(signal.SIGUSR1, lambda *_: notices.append(1))
    try:
        checkpoint.save(str(tmp_path), 1, student)
        helpers = [p for p in psutil.Process().children(recursive=True)
                   if "multiprocessing" in " ".join(p.cmdline())]
        assert helpers
        for pid in [os.getpid(), *(p.pid for p in helpers)]:
            os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in helpers)
        checkpoint.save(str(tmp_path), 2, student)
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert notices and checkpoint.latest_checkpoint(str(tmp_path)).endswith("step_000002")


def test_held_out_evaluation_during_training_keeps_the_best(single_rank, tmp_path, tok_file):
    from ark_mega.opd.trainer import Trainer

    out = tmp_path / "eval"
    Trainer(load_config(None, run_overrides(tmp_path, tok_file, out, steps=4, eval_every=2,
                                            keep_best=True))).run()
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    evaluated = [r["step"] for r in records if "heldout_cer_zh" in r]
    assert evaluated == [2, 4] and all("heldout_wer_en" in r for r in records if r["step"] in (2, 4))
    best = json.loads((out / "best" / "best.json").read_text())
    scores = {r["step"]: (r["heldout_cer_zh"] + r["heldout_wer_en"]) / 2 for r in records
              if r["step"] in (2, 4)}
    assert best["step"] == min(scores, key=scores.get) and best["score"] == min(scores.values())
    assert checkpoint.latest_checkpoint(str(out / "best")) is not None
    with pytest.raises(ValueError, match="need a held-out manifest"):
        load_config(None, ["stage=sft", "eval_every=10", "data.heldout=null"])
