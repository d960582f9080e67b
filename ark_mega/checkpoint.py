"""Checkpoints with megatron-core dist_checkpointing: atomic, keep-last-K, resumable, reshardable.

A checkpoint is a folder `<dir>/step_000123/` holding the model (and optimizer and scheduler)
as megatron sharded tensors, which load at any TP / PP layout, plus one small file per rank with
what is not a tensor of the model: the step, the data sampler's state and the RNG states. It is
written to `step_000123.tmp` and renamed into place when every rank has finished, so a crash
mid-save never leaves a partial checkpoint under a final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from torch.distributed.checkpoint import CheckpointException

from .distributed import any_rank

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted((n for n in os.listdir(root) if STEP_DIR.match(n)),
                   key=lambda n: int(STEP_DIR.match(n).group(1)))  # step_1000000 after step_999999
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(root: str) -> str | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve(path: str) -> str:
    """A checkpoint folder, or a folder of them (its newest)."""
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise FileNotFoundError(f"no checkpoint at {path}")
    return newest


def model_config(path: str):
    """The AudioLMConfig a checkpoint was saved with."""
    from .models.config import AudioLMConfig

    path = resolve(path)
    file = os.path.join(path, "model.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} has no model.json (saved without a model config)")
    with open(file) as f:
        return AudioLMConfig.from_dict(json.load(f))


def _rank_file(path: str) -> str:
    return os.path.join(path, f"rank_{dist.get_rank():05d}.pt")


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# The distributed optimizer's state is saved in the model's tensor layout (gathered over the
# data-parallel group), so it reshards to any TP / PP / DP layout like the weights; megatron's
# default for it is a deprecated format that its own save rejects.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _sharded(model, optimizer, scheduler, loading: bool) -> dict:
    model_sd = model.sharded_state_dict()
    sd = {"model": model_sd}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=loading,
                                                       metadata=OPTIMIZER_METADATA)
    return sd


def _megatron_optimizers(optimizer) -> list:
    """The megatron optimizers of `optimizer`, chained (one per parameter kind) or not."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _distributed(optimizer) -> bool | None:
    """Whether `optimizer` is megatron's distributed optimizer (None: no optimizer): its state
    is laid out differently, so a checkpoint resumes only with the kind that saved it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if optimizer is None:
        return None
    return any(isinstance(opt, DistributedOptimizer) for opt in _megatron_optimizers(optimizer))


def _prepare_optimizer_for_load(optimizer) -> None:
    """A distributed optimizer that has not stepped yet has no Adam state to load into (with
    torch's Adam, its state_dict() then fails): megatron's own dummy step allocates it, and the
    checkpoint replaces every value it leaves."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in _megatron_optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()
    _keep_adam_step_on_load()


# How a torch optimizer computes its step, not what it computes. `load_state_dict` takes these
# from the checkpoint's param groups like the hyperparameters: a run resumed with another
# `optim.fused` would silently compute as the saved run did.
ADAM_FORM = ("fused", "foreach", "capturable")


def _torch_optimizers(optimizer):
    return [opt.optimizer for opt in _megatron_optimizers(optimizer)]


def _adam_form(optimizer) -> list[list[dict]]:
    return [[{k: g[k] for k in ADAM_FORM if k in g} for g in opt.param_groups]
            for opt in _torch_optimizers(optimizer)]


def _set_adam_form(optimizer, form: list[list[dict]]) -> None:
    """Back to this run's form, each `step` where that form keeps it (as torch's own load
    would put it): a fused or capturable step reads it on the parameter's device, the others
    on the host."""
    for opt, groups in zip(_torch_optimizers(optimizer), form):
        for group, options in zip(opt.param_groups, groups):
            group.update(options)
            on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                state = opt.state.get(p, {})
                if "step" in state:
                    device = p.device if on_device else torch.device("cpu")
                    state["step"] = state["step"].to(device, torch.float32)


def _keep_adam_step_on_load() -> None:
    """Two faults of megatron-core 0.16's distributed optimizer with torch's Adam (no TE or
    apex) at load: it restores `step` as ONE tensor shared by all parameters, which Adam then
    increments once per parameter at each step (the resumed run diverges), and it copies every
    key of the Adam state from the per-parameter checkpoint tensors, which carry no `step`
    (KeyError). Each parameter gets its own copy of the restored step, kept as it is."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    setter = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(setter, "__ark_keeps_step__", False):
        return

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        if "step" in state and "step" not in tensors:
            state["step"] = state["step"].clone()
            tensors = {**tensors, "step": state["step"]}
        setter(self, model_param, tensors)

    set_states.__ark_keeps_step__ = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def save(root: str, step: int, model, optimizer=None, scheduler=None, extra: dict | None = None,
         keep_last: int | None = None) -> str:
    """Write checkpoint `step` under `root` (every rank calls this); return its folder. The
    model's config goes beside the tensors (`model.json`), so that a checkpoint describes
    itself (export, inference)."""
    with preemption_notice_held():
        return _save(root, step, model, optimizer, scheduler, extra, keep_last)


@contextlib.contextmanager
def preemption_notice_held():
    """SLURM's preemption notice (USR1) reaches every process of the job step, also the helper
    processes megatron's checkpoint writer starts at its first save, which have no handler for
    it: USR1 ended them, and the save the notice asks for then failed. Started while USR1 is
    blocked, they keep it blocked for good; this process's handler runs once the save ends."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _save(root, step, model, optimizer, scheduler, extra, keep_last) -> str:
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    try:
        dist_checkpointing.save(_sharded(model, optimizer, scheduler, loading=False), tmp)
        if dist.get_rank() == 0 and hasattr(model, "cfg"):
            with open(os.path.join(tmp, "model.json"), "w") as f:
                json.dump(model.cfg.to_dict(), f, indent=1)
        torch.save({"step": step, "scheduler": scheduler.state_dict() if scheduler else None,
                    "rng": rng_state(), "distributed_optimizer": _distributed(optimizer),
                    **(extra or {})}, _rank_file(tmp))
    except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
        shutil.rmtree(tmp, ignore_errors=True)  # the earlier checkpoints stay as they were
        free = shutil.disk_usage(root).free / 2**20
        raise OSError(f"saving checkpoint {final} failed: {_cause(e)} ({free:.1f} MiB free "
                      f"on that disk)") from e
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep_last:
            for old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _check_model_matches(path: str, model_sd: dict, saved: dict) -> None:
    """Name the tensors a checkpoint lacks, or holds at another shape, before megatron's load
    fails on the first of them with every key of the checkpoint in one line."""
    missing, reshaped = [], []
    for t in model_sd.values():
        if not isinstance(t, ShardedTensor):  # extra state, factories: megatron checks them
            continue
        if t.key not in saved:
            missing.append(t.key)
        elif tuple(saved[t.key].global_shape) != tuple(t.global_shape):
            reshaped.append(f"{t.key} {tuple(saved[t.key].global_shape)} (model "
                            f"{tuple(t.global_shape)})")
    if not missing and not reshaped:
        return
    try:
        cfg = model_config(path)
        held = f"holds a model of family {cfg.family}"
    except FileNotFoundError:
        held = "has no model.json"
    parts = [f"{what} {len(keys)} of the model's tensors, e.g. {', '.join(keys[:3])}"
             for what, keys in (("lacks", missing), ("holds at another shape", reshaped)) if keys]
    raise ValueError(f"checkpoint {path} does not match the model it is loaded into: it {held}, "
                     f"and {'; it '.join(parts)}")


def _cause(e: BaseException) -> str:
    """The first OS error (e.g. no space left on device) behind a failed save, else the
    innermost error's first line (torch's writer reports a full disk as a RuntimeError)."""
    seen, todo, last = set(), [e], e
    while todo:
        err = todo.pop(0)
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError) and err.strerror:
            return f"{err.strerror}" + (f" ({err.filename})" if err.filename else "")
        last = err
        todo += [c for c in (err.__cause__, err.__context__) if c is not None]
        if isinstance(err, CheckpointException):
            todo += [exc for exc, _ in err.failures.values()]
    text = str(last).strip().splitlines()
    return f"{type(last).__name__}: {text[0] if text else ''}"


def _resume_state(path: str) -> dict:
    """This rank's state of checkpoint `path` beside the tensors (step, scheduler, RNG, ...)."""
    rank_file = _rank_file(path)
    if any_rank(not os.path.isfile(rank_file)):  # every rank stops here, not only those without
        raise FileNotFoundError(f"{path} has no state for some ranks of this run: it was saved "
                                f"with fewer ranks; resume at the same world size, or load its "
                                f"weights only (as a stage's initial checkpoint)")
    return torch.load(rank_file, weights_only=False)


def saved_settings(path: str) -> dict:
    """What checkpoint `path` was trained with beside its tensors: the LR scheduler's state
    and Adam's `betas` (each absent when it was saved without)."""
    path = resolve(path)
    settings = dict(_resume_state(path).get("scheduler") or {})
    groups = _param_groups(dist_checkpointing.load_common_state_dict(path).get("optimizer"))
    if groups:
        settings["betas"] = tuple(groups[0]["betas"])
    return settings


def _param_groups(state) -> list | None:
    """The torch param groups inside an optimizer's saved common state (nested differently
    by megatron's plain and distributed optimizers)."""
    if isinstance(state, dict):
        if "param_groups" in state:
            return state["param_groups"]
        state = list(state.values())
    if isinstance(state, list):
        for item in state:
            found = _param_groups(item)
            if found:
                return found
    return None


def load(path: str, model, optimizer=None, scheduler=None, strict: bool = True,
         optional: tuple[str, ...] = ()) -> dict:
    """Load a checkpoint (or the newest in a folder of them) into `model` (and optimizer /
    scheduler) at the current layout;
    return this rank's extra state (step, sampler, ...) with the RNG states restored.
    With `optimizer=None` only the weights are read (e.g. initial weights of a new stage).
    Model tensors whose names start with one of `optional` (e.g. a training-only head) keep
    their initial values when the checkpoint lacks them; tensors the checkpoint has and the
    model lacks are not read."""
    path = resolve(path)
    if optimizer is not None:
        extra = _resume_state(path)
        saved_kind, kind = extra.get("distributed_optimizer"), _distributed(optimizer)
        if saved_kind is not None and saved_kind != kind:  # megatron would fail on a missing key
            raise ValueError(f"{path} was saved with megatron's distributed optimizer "
                             f"{'on' if saved_kind else 'off'}, this run has it "
                             f"{'on' if kind else 'off'} (optim.distributed; by default on with "
                             f"CUDA only): resume with the same, or start a new output_dir from "
                             f"its weights (student.checkpoint)")
        _prepare_optimizer_for_load(optimizer)
    sharded = _sharded(model, optimizer, scheduler, loading=True)
    if optional and optimizer is not None:
        raise ValueError("optional tensors are for loading weights only, not for a resume")
    saved = dist_checkpointing.load_tensors_metadata(path)
    absent = [k for k, t in sharded["model"].items()
              if k.startswith(optional) and getattr(t, "key", k) not in saved]
    for k in absent:
        del sharded["model"][k]
    _check_model_matches(path, sharded["model"], saved)
    state = dist_checkpointing.load(sharded, path)
    if absent:
        own = model.state_dict()
        state["model"].update({k: own[k] for k in absent})
    model.load_state_dict(state["model"], strict=strict)
    if optimizer is None:
        return {}
    form = _adam_form(optimizer)
    optimizer.load_state_dict(state["optimizer"])
    _set_adam_form(optimizer, form)
    if scheduler is not None and extra.get("scheduler") is not None:
        scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return extra
