"""The trainer: one megatron-core engine for the SFT, TD and OPD stages.

    Trainer(cfg).run()

Student (and, for TD / OPD, a frozen teacher in eval mode) share one TP / PP / DP layout. The
student trains with megatron's DistributedDataParallel, megatron's optimizer (Adam, gradient
clipping, the distributed optimizer with CUDA) and its LR schedules. Checkpoints are atomic,
kept to the last K, and a restarted run resumes from the newest one: model, optimizer,
scheduler, RNG and the data position.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time

import psutil
import torch
import torch.distributed as dist
from lhotse import CutSet
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from .. import checkpoint
from ..config import ModelConfig, OptimConfig, RunConfig, to_dict
from ..data import (Batch, Collator, CutBatches, LoadPolicy, ManifestError, TokenBudgetSampler,
                    TokenCounter, TokenLimit)
from ..data.nemo_tarred import shard_pairs
from ..data.stream import ManifestStream, SkipLedger
from ..distributed import any_rank, device, init_parallel
from ..factory import build_model, run_dtype
from ..metrics_log import MetricsLog
from ..models import AudioLM
from ..transcribe import blocked_ids, evaluate
from .steps import JointCTC, OPDStep, sft_step
from .teacher_data import write_teacher_manifest
from .token_map import TokenMap


def build_optimizer(model: AudioLM, o: OptimConfig, dtype: torch.dtype, steps: int):
    """megatron DDP around `model`, megatron's Adam (distributed over data-parallel ranks and
    torch's fused AdamW with CUDA, unless `o.distributed` / `o.fused` say otherwise) and its LR
    schedule over `steps`."""
    distributed = torch.cuda.is_available() if o.distributed is None else o.distributed
    ddp = DistributedDataParallel(
        config=model.config, module=model,
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=distributed,
                                                 grad_reduce_in_fp32=True))
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16, params_dtype=dtype,
        use_distributed_optimizer=distributed), [ddp])
    fused = torch.cuda.is_available() if o.fused is None else o.fused
    if fused:
        for inner in optimizer.chained_optimizers:
            for group in inner.optimizer.param_groups:
                group.update(fused=True, foreach=False)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(steps, o.warmup_steps + 1),
        lr_decay_style=o.schedule, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(steps, 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=o.on_resume != "config",
        override_opt_param_scheduler=o.on_resume == "config")
    return ddp, optimizer, scheduler


# megatron's scheduler state (wd_incr_steps is left out: the weight decay is constant) and
# Adam's betas, as the config names them; the decay's length matters only to a schedule that
# decays
RESUME_SETTINGS = {"max_lr": "optim.lr", "min_lr": "optim.min_lr",
                   "lr_warmup_steps": "optim.warmup_steps", "lr_decay_style": "optim.schedule",
                   "lr_decay_steps": "steps", "start_wd": "optim.weight_decay",
                   "end_wd": "optim.weight_decay",
                   "betas": "(optim.adam_beta1, optim.adam_beta2)"}


def resume_differences(saved: dict, config: dict) -> dict[str, tuple]:
    """{config setting: (checkpoint's value, config's value)} where the settings a checkpoint
    was saved with (`checkpoint.saved_settings`) and this run's differ."""
    constant = saved.get("lr_decay_style") == config["lr_decay_style"] == "constant"
    return {name: (saved[key], config[key]) for key, name in RESUME_SETTINGS.items()
            if key in saved and saved[key] != config[key]
            and not (key == "lr_decay_steps" and constant)}


# bytes per parameter of one checkpoint: weights, fp32 main copy and Adam's two moments (bf16);
# an upper bound for fp32 training (weights + moments)
CHECKPOINT_BYTES_PER_PARAM = 2 + 4 + 8


def check_inputs(cfg: RunConfig, model: AudioLM) -> None:
    """Before the first step: the manifests exist, the output folder is writable and its disk
    has room for one checkpoint (every rank checks; a failure names the setting and path)."""
    manifests = [("data.heldout", cfg.data.heldout)]
    if cfg.data.tarred_audio_filepaths:  # every shard's manifest and tar
        shard_pairs(cfg.data.train, cfg.data.tarred_audio_filepaths)
    else:
        manifests.append(("data.train", cfg.data.train))
    for key, path in manifests:
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{key}: {path} does not exist")
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
        probe = os.path.join(cfg.output_dir, f".write_probe_{dist.get_rank()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(f"output_dir: cannot write to {cfg.output_dir} ({e.strerror})") from None
    params = sum(p.numel() for p in model.parameters())
    layout = ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size()
    need = params * layout * CHECKPOINT_BYTES_PER_PARAM
    free = shutil.disk_usage(cfg.output_dir).free
    if free < need:
        raise OSError(f"output_dir: {cfg.output_dir} has {free / 2**30:.1f} GiB free, one "
                      f"checkpoint needs about {need / 2**30:.1f} GiB")


PREEMPTED_EXIT_CODE = 3  # examples/train_opd.py exits with it after a preemption save


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        # SLURM's --signal=USR1@T warns of the time limit / preemption: finish the step, save, stop
        self.preempted = False
        signal.signal(signal.SIGUSR1, self._on_usr1)
        init_parallel(cfg.parallel)
        self.dtype = run_dtype(cfg)
        self.dev = device()
        # "student" is the model this run trains, whichever family (the demo's teacher SFT
        # trains a Qwen3-ASR model); its prompts follow its family's template
        self.student, self.student_prompts = build_model(cfg.student, self.dtype,
                                                         ctc_head=cfg.sft.ctc_weight > 0)
        if cfg.student.checkpoint:  # a CTC head the checkpoint lacks starts fresh
            checkpoint.load(cfg.student.checkpoint, self.student, optional=("ctc_head.",))
        self.tokens = TokenCounter(self.student_prompts)  # the stream's and the sampler's
        self.teacher = self.teacher_prompts = None
        if cfg.stage in ("td", "opd"):
            teacher_cfg = cfg.teacher
            if not teacher_cfg.tokenizer:
                teacher_cfg = ModelConfig(**{**vars(teacher_cfg), "tokenizer": cfg.student.tokenizer})
            self.teacher, self.teacher_prompts = build_model(teacher_cfg, self.dtype)
            if not cfg.teacher.checkpoint:
                raise ValueError(f"stage {cfg.stage}: teacher.checkpoint is required")
            checkpoint.load(cfg.teacher.checkpoint, self.teacher)
            self.teacher.eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
        check_inputs(cfg, self.student)
        self.is_writer = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                          and ps.get_data_parallel_rank() == 0)
        if self.is_writer:
            built = [f"{role} {m.transformer_impl} layers" for role, m in
                     (("student", self.student), ("teacher", self.teacher)) if m is not None]
            layout = (f"{dist.get_world_size()} ranks (DP {ps.get_data_parallel_world_size()}, "
                      f"TP {ps.get_tensor_model_parallel_world_size()}, "
                      f"PP {ps.get_pipeline_model_parallel_world_size()})")
            print(f"[{cfg.name}] {', '.join(built)}, {self.dtype}, on {self.dev}, {layout}", flush=True)
        self.ddp, self.optimizer, self.scheduler = build_optimizer(
            self.student, cfg.optim, self.dtype, cfg.steps)

    def _on_usr1(self, signum, frame):
        self.preempted = True

    # ------------------------------------------------------------------ setup

    def _load_policy(self) -> LoadPolicy:
        data = self.cfg.data
        return LoadPolicy(skip_bad=data.skip_bad, max_skip_fraction=data.max_skip_fraction,
                          max_duration=data.max_duration)

    def _train_stream(self) -> ManifestStream | None:
        """None when USR1 stopped TD's transcription."""
        cfg = self.cfg
        manifest, subset, tars = cfg.data.train, cfg.data.subset, cfg.data.tarred_audio_filepaths
        if cfg.stage == "td":  # the teacher transcribes the subset only: take all it wrote
            manifest, subset, tars = self._teacher_transcripts(), 1.0, None
            if manifest is None:
                return None
        return ManifestStream(manifest, self._load_policy(), subset,
                              on_skip=self._report_skip if self.is_writer else None,
                              tarred_audio=tars,
                              admit=TokenLimit(self.tokens, cfg.data.max_tokens, "data.max_tokens"))

    def _report_skip(self, err: ManifestError) -> None:
        print(f"[{self.cfg.name}] skipped {err}", flush=True)

    def _teacher_transcripts(self) -> str | None:
        """TD: the teacher transcribes the training audio (data.subset of it) into a manifest,
        resumably (ark_mega/opd/teacher_data.py); None when USR1 stopped it."""
        cfg = self.cfg
        out = cfg.td_manifest or os.path.join(cfg.output_dir, "teacher_transcripts.jsonl")
        if os.path.isfile(out):
            return out  # made by this run before a restart: the train manifest is not read
        cuts = ManifestStream(cfg.data.train, self._load_policy(), cfg.data.subset,
                              on_skip=self._report_skip if self.is_writer else None,
                              tarred_audio=cfg.data.tarred_audio_filepaths)
        total = sum(1 for _ in cuts)  # one pass: the count, and the records' read-time checks
        SkipLedger(cuts).check(cfg.data.max_skip_fraction)  # before the teacher's hours of work
        blocked = blocked_ids(self.teacher_prompts, self.teacher.cfg.decoder.vocab_size,
                              cfg.opd.blocked_from)
        return write_teacher_manifest(self.teacher, self.teacher_prompts, cuts, total, out,
                                      blocked, cfg.opd.generation.max_new_tokens,
                                      cfg.eval_batch_tokens, cfg.teacher.checkpoint,
                                      stop=lambda: self.preempted)

    def _loader(self, cuts: CutSet, epoch: int, consumed: int):
        cfg = self.cfg

        def new_sampler():
            s = TokenBudgetSampler(cuts, cfg.data.max_tokens, self.tokens,
                                   num_buckets=cfg.data.num_buckets, seed=cfg.seed,
                                   rank=ps.get_data_parallel_rank(),
                                   world_size=ps.get_data_parallel_world_size())
            s.set_epoch(epoch)
            return s

        sampler = new_sampler()
        if consumed:  # resume: the position after the last batch the run used (workers prefetch,
            scout = new_sampler()  # so the sampler's own state would be ahead of it)
            it = iter(scout)
            for _ in range(consumed):
                next(it)
            sampler.load_state_dict(scout.state_dict())
        data = CutBatches(Collator(self.student_prompts), self._load_policy())
        return torch.utils.data.DataLoader(data, sampler=sampler, batch_size=None,
                                           num_workers=cfg.data.num_workers,
                                           persistent_workers=False)

    # ------------------------------------------------------------------ loop

    def run(self) -> dict:
        cfg = self.cfg
        step, epoch, consumed = 0, 0, 0
        found = checkpoint.latest_checkpoint(self.ckpt_dir)
        if found and not cfg.resume:  # keep_last would delete this run's own checkpoints first
            raise ValueError(f"resume is off but {self.ckpt_dir} holds checkpoints (newest "
                             f"{os.path.basename(found)}): remove them or use another output_dir")
        if found:
            step, epoch, consumed = self._resume(found)
        stream = self._train_stream()
        if stream is None:  # USR1 during TD's transcription: its shards keep what is done
            self._mark_preempted(step, "the teacher's transcripts so far")
            return {}
        self.skips = SkipLedger(stream, ps.get_data_parallel_group(), self.dev)
        cuts = stream.cuts()
        loader = iter(self._loader(cuts, epoch, consumed))
        opd = ctc = None
        if cfg.sft.ctc_weight:
            ctc = JointCTC(cfg.sft.ctc_weight, self.student_prompts.encode)
        if cfg.stage == "opd":
            blocked = blocked_ids(self.student_prompts, self.student.cfg.decoder.vocab_size,
                                  cfg.opd.blocked_from).to(self.dev)
            tmap = TokenMap(self.student_prompts.tokenizer, self.teacher_prompts.tokenizer,
                            self.student.cfg.decoder.vocab_size,
                            self.teacher.cfg.decoder.vocab_size, cfg.opd.min_token_map_coverage)
            if self.is_writer:
                print(f"token map: {'identity' if tmap.identity else 'by token string'}, "
                      f"coverage {100 * tmap.coverage:.1f}%")
            opd = OPDStep(self.ddp, self.teacher, self.student_prompts, self.teacher_prompts, tmap,
                          cfg.opd, blocked)
        log = MetricsLog(cfg.output_dir, cfg.name, cfg.steps, self.is_writer, resumed_at=step)
        if self.is_writer:
            with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
                json.dump(to_dict(cfg), f, indent=1, default=str)
        bad_in_a_row, result = 0, {}
        self.ddp.train()
        while step < cfg.steps:
            batches = []
            for _ in range(cfg.data.micro_batches):
                batch, loader, epoch, consumed = self._next_batch(loader, cuts, epoch, consumed)
                batches.append(batch)
            t0 = time.perf_counter()
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            metrics = opd(batches, step) if opd else sft_step(self.ddp, batches, ctc)
            state = self._loss_state(metrics.get("loss"))
            step += 1
            if state == "none":  # every rollout of the global batch empty: nothing to learn
                metrics["skipped_empty"] = 1
            elif state == "nonfinite":
                bad_in_a_row += 1
                metrics["skipped_nonfinite"] = 1
                if bad_in_a_row >= cfg.max_nonfinite_in_a_row:
                    raise RuntimeError(f"{bad_in_a_row} non-finite losses in a row (step {step}); "
                                       f"stopping (max_nonfinite_in_a_row)")
            else:
                bad_in_a_row = 0
                finalize_model_grads([self.ddp])
                _, grad_norm, _ = self.optimizer.step()
                self.scheduler.step(1)
                metrics["grad_norm"] = grad_norm
            metrics.update(self._throughput(batches, time.perf_counter() - t0))
            metrics["data_skipped"], metrics["data_records_read"] = self.skips.check(
                cfg.data.max_skip_fraction)
            metrics["lr"] = self.optimizer.param_groups[0]["lr"]
            if cfg.eval_every and step % cfg.eval_every == 0:
                rates = self.evaluate()
                metrics.update({f"heldout_{k}": v for k, v in rates.items()})
                if cfg.keep_best:
                    self._keep_if_best(step, rates)
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.log(step, metrics)
            result = metrics
            stop = any_rank(self.preempted)
            if step % cfg.save_every == 0 or step == cfg.steps or stop:
                checkpoint.save(self.ckpt_dir, step, self.student, self.optimizer, self.scheduler,
                                extra={"epoch": epoch, "consumed": consumed}, keep_last=cfg.keep_last)
            if stop:
                self._mark_preempted(step)
                break
        log.close()
        return result

    def _resume(self, found: str) -> tuple[int, int, int]:
        """Load checkpoint `found` (model, optimizer, scheduler, RNG) once the settings it was
        trained with pass `_check_resume_settings`: (step, epoch, sampler batches consumed)."""
        self._check_resume_settings(found)
        extra = checkpoint.load(found, self.student, self.optimizer, self.scheduler)
        if self.cfg.optim.on_resume == "config":
            # torch's load took the param groups' betas and max_lr / min_lr (which megatron's
            # schedule reads before its own) from the checkpoint too
            o = self.cfg.optim
            for group in self.optimizer.param_groups:
                group.update(max_lr=o.lr, min_lr=o.min_lr, betas=(o.adam_beta1, o.adam_beta2))
        # megatron's scheduler load steps to the saved step before it reads the saved weight
        # decay: set the param groups again from the settings now in force
        self.scheduler.step(0)
        if self.is_writer:
            print(f"resumed from {found} at step {extra['step']}")
        return extra["step"], extra["epoch"], extra["consumed"]

    def _check_resume_settings(self, found: str) -> None:
        """Before a resume loads anything: a checkpoint whose LR schedule or Adam betas differ
        from the config's is refused (optim.on_resume=check) or followed, as the setting says."""
        o = self.cfg.optim
        differ = resume_differences(checkpoint.saved_settings(found), {
            **self.scheduler.state_dict(), "betas": (o.adam_beta1, o.adam_beta2)})
        if not differ:
            return
        listed = ", ".join(f"{k} {a} (config {b})" for k, (a, b) in differ.items())
        mode = self.cfg.optim.on_resume
        if mode == "check":
            raise ValueError(f"{found} was trained with other optimizer settings: the "
                             f"checkpoint has {listed}; set optim.on_resume=config to follow "
                             f"the config's from the resumed step on, or "
                             f"optim.on_resume=checkpoint to keep the checkpoint's")
        if self.is_writer:
            kept = "the checkpoint's" if mode == "checkpoint" else "the config's"
            print(f"[{self.cfg.name}] resuming with {kept} optimizer settings "
                  f"(optim.on_resume={mode}); the checkpoint has {listed}", flush=True)

    def _keep_if_best(self, step: int, rates: dict) -> None:
        """Save the weights to output_dir/best when their mean held-out error is the lowest so
        far (best.json holds the step and rates; it survives a resume)."""
        root = os.path.join(self.cfg.output_dir, "best")
        record = os.path.join(root, "best.json")
        score = sum(rates.values()) / max(len(rates), 1)
        if os.path.isfile(record):
            with open(record) as f:
                if json.load(f)["score"] <= score:
                    return
        checkpoint.save(root, step, self.student, keep_last=1)
        if dist.get_rank() == 0:
            with open(record, "w") as f:
                json.dump({"step": step, "score": score, **rates}, f)
        dist.barrier()

    def _next_batch(self, loader, cuts, epoch, consumed):
        """The next batch on every data-parallel rank; a new epoch for all when any runs out
        (its other ranks' batch of that round is dropped, as with drop_last)."""
        batch, consumed = self._pull(loader, consumed)
        if any_rank(batch is None):
            epoch = epoch + 1
            loader = iter(self._loader(cuts, epoch, 0))
            batch, consumed = self._pull(loader, 0)
            if batch is None:
                raise ValueError(f"{self.cfg.data.train}: an epoch gave this rank no batch")
        return batch, loader, epoch, consumed

    def _pull(self, loader, consumed: int):
        """This rank's next batch that kept a cut (None at the end of the epoch), and the count
        of sampler batches consumed; cuts the workers dropped go to the skip ledger."""
        for item in loader:
            consumed += 1
            for err in self.skips.add(item.skipped):
                self._report_skip(err)
            if isinstance(item, Batch):
                return item, consumed
        return None, consumed

    def _mark_preempted(self, step: int, saved: str | None = None) -> None:
        """Tell the launcher (slurm/opd.sbatch) that the run stopped on USR1 after saving
        (step's checkpoint, or what `saved` names): the exit code is 3, and torchrun, which
        reports 1 for any failed worker, is bypassed by the file named in ARK_PREEMPT_MARKER."""
        self.preempted = True
        saved = saved or f"step {step}"
        if dist.get_rank() == 0:
            print(f"[{self.cfg.name}] USR1: saved {saved} and stopping", flush=True)
            marker = os.environ.get("ARK_PREEMPT_MARKER")
            if marker:
                with open(marker, "w") as f:
                    f.write(f"{saved}\n")

    def _loss_state(self, loss: float | None) -> str:
        """"ok", "nonfinite", or "none" (the step scored no position: OPD's rollouts all
        empty); the last stage's loss decides for every rank. Either of the last two leaves the
        weights and the optimizer's moments as they are."""
        flags = torch.zeros(2, device=self.dev)
        if ps.is_pipeline_last_stage():
            flags[0] = loss is None
            flags[1] = loss is not None and not math.isfinite(loss)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        none, nonfinite = flags.tolist()
        return "none" if none else "nonfinite" if nonfinite else "ok"

    def _throughput(self, batches, seconds: float) -> dict:
        counts = torch.tensor([sum(b.num_tokens for b in batches), sum(len(b.cut_ids) for b in batches)],
                              dtype=torch.float64, device=self.dev)
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
        mem = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
               else psutil.Process().memory_info().rss / 2**30)
        return {"step_time": seconds, "tokens_per_s": counts[0].item() / seconds,
                "samples_per_s": counts[1].item() / seconds, "memory_gib": mem}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, manifest: str | None = None) -> dict:
        return evaluate(self.student, self.student_prompts, manifest or self.cfg.data.heldout,
                        self.cfg)
