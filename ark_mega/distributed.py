"""Process groups and megatron-core parallel state, on GPU (NCCL) or CPU (gloo).

`init_parallel` is the single entry point: it starts torch.distributed from the torchrun
environment (or as a one-process group when run plainly), adapts megatron-core to the CPU when
CUDA is absent, builds the TP / PP / DP groups and seeds the model-parallel RNG tracker.

The CPU adapter lives here and nowhere else. megatron-core assumes CUDA in a few places that the
training path reaches; each patched site has its own test in tests/test_distributed.py.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    seed: int = 1234  # initial weights (torch and megatron's RNG tracker); `seed`: data order
    timeout_minutes: int = 30

    def __post_init__(self):
        for name in ("tensor_parallel", "pipeline_parallel", "timeout_minutes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name} must be an integer of at least 1, got {value!r}")


def device() -> torch.device:
    """The device this process computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# (tensor_parallel, pipeline_parallel, timeout_minutes) of megatron's current groups, and the
# groups `initialize_model_parallel` made for them
_layout: tuple[int, int, int] | None = None
_groups: list = []


def init_parallel(cfg: ParallelConfig) -> None:
    """Initialise torch.distributed and megatron parallel_state for `cfg`. Groups of the same
    layout made before (an earlier stage of the same process) are kept: made anew, each would
    hold its communicators (gloo: threads; NCCL: device memory) for the life of the process.
    Every group is destroyed at exit."""
    global _layout, _groups
    from megatron.core import parallel_state, tensor_parallel

    if not torch.cuda.is_available():
        adapt_megatron_to_cpu()
    if not dist.is_initialized():
        _init_process_group(cfg.timeout_minutes)
        # A process that exits with its gloo groups alive can abort in their threads'
        # destructors ("terminate called without an active exception") after its work is done.
        atexit.unregister(destroy_parallel)
        atexit.register(destroy_parallel)
    world = dist.get_world_size()
    model_parallel = cfg.tensor_parallel * cfg.pipeline_parallel
    if world % model_parallel != 0:
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel ({cfg.tensor_parallel}) "
            f"x pipeline_parallel ({cfg.pipeline_parallel})"
        )
    layout = (cfg.tensor_parallel, cfg.pipeline_parallel, cfg.timeout_minutes)
    if not parallel_state.model_parallel_is_initialized() or layout != _layout:
        _destroy_model_parallel()
        before = set(_all_groups())
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_parallel,
            pipeline_model_parallel_size=cfg.pipeline_parallel,
            distributed_timeout_minutes=cfg.timeout_minutes,
        )
        _layout, _groups = layout, [g for g in _all_groups() if g not in before]
    # Same seed on every process: the model-parallel tracker offsets it per TP rank itself.
    torch.manual_seed(cfg.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows of a vocabulary-parallel output layer: global ids [start, start + size),
    and the tensor-parallel group that holds the other rows (None without tensor parallelism):
    what every vocabulary kernel takes (`vocab_start`, `tp_group`)."""

    start: int
    size: int
    group: object | None

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This shard's rows of a tensor over the whole vocabulary."""
        return full[self.start:self.start + self.size]


def any_rank(flag: bool, group=None) -> bool:
    """Whether `flag` is true on any rank of `group` (all ranks by default): a decision every
    rank of it takes together."""
    out = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return bool(out.item())


def vocab_shard(rows: int) -> VocabShard:
    """The shard of an output layer whose local weight has `rows` rows."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    return VocabShard(ps.get_tensor_model_parallel_rank() * rows, rows,
                      ps.get_tensor_model_parallel_group() if tp > 1 else None)


def destroy_parallel() -> None:
    _destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _destroy_model_parallel() -> None:
    """megatron's groups destroyed, not only forgotten: megatron's `destroy_model_parallel`
    drops its references, but torch.distributed keeps every group it made, communicators and
    all, until each is destroyed."""
    global _layout, _groups
    from megatron.core import parallel_state

    live = set(_all_groups())
    for group in _groups:
        if group in live:
            dist.destroy_process_group(group)
    parallel_state.destroy_model_parallel()
    _layout, _groups = None, []


def _all_groups() -> list:
    """Every process group torch.distributed holds (none before it is initialised)."""
    return list(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else []


def _init_process_group(timeout_minutes: int) -> None:
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if torch.cuda.is_available():
        # more processes than GPUs on a node (a test, a check) share them rather than fail
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:  # a plain `python` run: a group of one, no rendezvous needed
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )


# --------------------------------------------------------------------------------------------
# CPU adapter for megatron-core
# --------------------------------------------------------------------------------------------


def _cpu_rng_state(device: int | str | torch.device = -1, clone: bool = False,
                   graph_safe: bool = False) -> torch.Tensor:
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1,
                       graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cuda_is_cpu():
    """`tensor.cuda()` as the identity, for megatron code that moves tensors to "the" GPU."""
    return _patched(torch.Tensor, "cuda", lambda self, *a, **k: self)


@contextlib.contextmanager
def _patched(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def _cuda_type_names():
    """`tensor.type()` names CPU tensors as their CUDA counterparts ('torch.cuda.FloatTensor'),
    for megatron's optimizers, which sort parameters by comparing these names."""
    real = torch.Tensor.type

    def type_(self, *args, **kwargs):
        if args or kwargs:
            return real(self, *args, **kwargs)
        name = real(self)
        return name if self.is_cuda else name.replace("torch.", "torch.cuda.", 1)

    return _patched(torch.Tensor, "type", type_)


def _adapted(fn, context):
    """`fn` run inside `context()`; marked so that adapting twice wraps once."""
    if getattr(fn, "__ark_cpu_adapted__", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)

    wrapper.__ark_cpu_adapted__ = True
    return wrapper


class _CudaLiteralsToCpu:
    """Stands in for `torch` inside one megatron module: `device="cuda"` becomes the CPU."""

    def __init__(self, real_torch):
        self._torch = real_torch

    def __getattr__(self, name):
        attr = getattr(self._torch, name)
        if name in ("zeros", "ones", "empty", "tensor", "full"):
            @functools.wraps(attr)
            def on_cpu(*args, **kwargs):
                if str(kwargs.get("device", "")).startswith("cuda"):
                    kwargs["device"] = "cpu"
                return attr(*args, **kwargs)

            return on_cpu
        return attr


def adapt_megatron_to_cpu() -> None:
    """Make the megatron-core paths ark_mega uses run on the CPU. Idempotent; CPU only.

    Sites:
      1. `torch.cuda.current_device()` is used as an allocation device -> the CPU device.
      2. the CUDA RNG-state helpers of the model-parallel RNG tracker -> the CPU generator
         (the tracker also calls `torch.cuda.get_rng_state`/`manual_seed` directly).
      3. `device="cuda"` literals in `pipeline_parallel.schedules`, the optimizer modules
         (`optimizer.optimizer`, `optimizer.clip_grads`) and `utils` (the local multi-tensor
         L2 norm used for gradient clipping) -> the CPU.
      4. `LanguageModule.setup_embeddings_and_output_layer` moves the tied output weight with
         `.cuda()` before its all-reduce at PP > 1 -> stays on the CPU.
      5. `torch.cuda.synchronize()` after pipeline sends / receives -> nothing to wait for
         (gloo's CPU collectives are synchronous).
      6. `clip_grad_by_total_norm_fp32` asserts CUDA gradients -> a CPU version of the same.
      7. the mixed-precision and distributed optimizers sort parameters by `param.type()`
         against CUDA type names -> in their constructors CPU tensors carry those names.
      8. the distributed optimizer gathers its state for a checkpoint through `.cuda()`
         copies -> they stay on the CPU.
    """
    if torch.cuda.is_available():
        raise RuntimeError("adapt_megatron_to_cpu is only for processes without CUDA")
    from megatron.core import utils as mp_utils
    from megatron.core.models.common.language_module import language_module
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as mp_optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.current_device = lambda: torch.device("cpu")  # site 1

    mp_random._get_cuda_rng_state = _cpu_rng_state  # site 2
    mp_random._set_cuda_rng_state = _set_cpu_rng_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = torch.manual_seed

    for module in (schedules, mp_optimizer, clip_grads, mp_utils):  # site 3
        if not isinstance(module.torch, _CudaLiteralsToCpu):
            module.torch = _CudaLiteralsToCpu(torch)

    module = language_module.LanguageModule  # site 4
    module.setup_embeddings_and_output_layer = _adapted(
        module.setup_embeddings_and_output_layer, _cuda_is_cpu)

    torch.cuda.synchronize = lambda device=None: None  # site 5

    mp_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm  # site 6

    for cls in (mp_optimizer.Float16OptimizerWithFloat16Params,  # site 7
                distrib_optimizer.DistributedOptimizer):
        cls.__init__ = _adapted(cls.__init__, _cuda_type_names)

    cls = distrib_optimizer.DistributedOptimizer  # site 8
    cls.get_parameter_state_dp_zero = _adapted(cls.get_parameter_state_dp_zero, _cuda_is_cpu)


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32, for CPU gradients: scale them so that their
    total norm (already reduced over the model-parallel groups) is at most max_norm."""
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = param.decoupled_grad if use_decoupled_grad else param.grad
        if grad is not None:
            grad.detach().mul_(clip_coeff)
