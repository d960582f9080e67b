"""The CPU adapter for megatron-core, one test per patched site, and the process groups
`init_parallel` keeps (ark_mega/distributed.py)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core import tensor_parallel
from megatron.core.models.common.language_module import language_module
from megatron.core.pipeline_parallel import schedules
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from ark_mega.distributed import ParallelConfig, adapt_megatron_to_cpu, init_parallel

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU adapter is CPU-only")


def test_adapter_is_idempotent(single_rank):
    wrapped = language_module.LanguageModule.setup_embeddings_and_output_layer
    adapt_megatron_to_cpu()
    assert language_module.LanguageModule.setup_embeddings_and_output_layer is wrapped


def test_site1_current_device_allocates_on_cpu(single_rank):
    # megatron allocates "on the current CUDA device" when CPU initialisation is off.
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                               use_cpu_initialization=False)
    layer = ColumnParallelLinear(8, 4, config=config, init_method=config.init_method,
                                 bias=True, gather_output=False)
    assert layer.weight.device.type == "cpu"


def test_site2_model_parallel_rng_tracker_forks_cpu_state(single_rank):
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    with tracker.fork():
        a = torch.rand(4)
    b = torch.rand(4)
    torch.manual_seed(0)
    c = torch.rand(4)
    assert torch.equal(b, c), "fork() must restore the default generator's state"
    assert not torch.equal(a, c), "fork() must draw from the tracker's own stream"


def test_site3_cuda_literals_land_on_cpu(single_rank):
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mp_optimizer

    for module in (schedules, mp_optimizer, clip_grads, utils):
        assert module.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
        assert module.torch.tensor([1.0], device="cuda").device.type == "cpu"
        assert module.torch.float32 is torch.float32


def test_site4_cuda_moves_are_scoped_to_the_tied_embedding_setup(single_rank):
    assert getattr(language_module.LanguageModule.setup_embeddings_and_output_layer,
                   "__ark_cpu_adapted__", False)
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1).cuda()  # not patched outside that one function


def test_site5_synchronize_is_a_no_op(single_rank):
    torch.cuda.synchronize()


def test_site6_gradient_clipping_on_cpu(single_rank):
    from megatron.core.optimizer import optimizer as mp_optimizer

    params = [torch.nn.Parameter(torch.ones(4)) for _ in range(2)]
    for p in params:
        p.grad = torch.full((4,), 2.0)
    total = float(torch.cat([p.grad for p in params]).norm())  # 5.657
    mp_optimizer.clip_grad_by_total_norm_fp32(params, 1.0, total)
    assert float(torch.cat([p.grad for p in params]).norm()) == pytest.approx(1.0, rel=1e-5)
    mp_optimizer.clip_grad_by_total_norm_fp32(params, 10.0, 1.0)  # below the bound: unchanged
    assert float(torch.cat([p.grad for p in params]).norm()) == pytest.approx(1.0, rel=1e-5)


def bf16_distributed_optimizer():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from ark_mega.models import AudioLM, preset

    model = AudioLM(preset("tiny_ark_asr"), dtype=torch.bfloat16)
    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True, params_dtype=torch.bfloat16,
                                                 use_distributed_optimizer=True), [ddp])
    return ddp, opt


def test_site7_optimizers_see_cuda_type_names_only_while_built(single_rank):
    _, opt = bf16_distributed_optimizer()
    assert type(opt.chained_optimizers[0]).__name__ == "DistributedOptimizer"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.BFloat16Tensor"  # restored


def test_site8_distributed_optimizer_state_gathers_on_cpu(single_rank):
    ddp, opt = bf16_distributed_optimizer()
    ids = torch.randint(0, 200, (1, 12))
    ddp(ids, None, torch.tensor([0, 12])).float().pow(2).sum().backward()
    assert opt.step()[0]
    state = opt.chained_optimizers[0].get_parameter_state_dp_zero()
    def tensors(x):
        if isinstance(x, torch.Tensor):
            return [x]
        items = x.values() if isinstance(x, dict) else x if isinstance(x, list) else []
        return [t for item in items for t in tensors(item)]

    found = tensors(state)
    assert len(found) >= 3 and all(t.device.type == "cpu" for t in found)  # param, exp_avg(_sq)


def test_megatron_optimizer_steps_on_cpu(single_rank):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from ark_mega.models import AudioLM, preset

    model = AudioLM(preset("tiny_ark_asr"))
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(),
                                  module=model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.1,
                                                 bf16=False), [ddp])
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 200, (1, 12))
    ddp(ids, None, torch.tensor([0, 12])).float().pow(2).sum().backward()
    ok, grad_norm, _ = opt.step()
    assert ok and grad_norm > 0.1  # clipped
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_world_size_must_fit_the_layout(single_rank):
    with pytest.raises(ValueError, match="not divisible"):
        init_parallel(ParallelConfig(tensor_parallel=2))
    init_parallel(ParallelConfig())


def test_groups_of_a_layout_made_before_are_kept_and_others_destroyed(single_rank):
    """A process that runs stages one after another (the demo) initialises the same layout
    again: megatron's groups are kept, not made anew beside the old ones (each gloo group holds
    threads that wake up: ~3,000 of them took a core from the test suite). Another layout (here
    a longer timeout) destroys them first (their threads end with the last reference to them);
    a group of the caller's own survives both."""
    def threads():
        return len(os.listdir("/proc/self/task"))

    own = dist.new_group([0])
    init_parallel(ParallelConfig())
    kept, count = parallel_state.get_data_parallel_group(), threads()
    for _ in range(3):
        init_parallel(ParallelConfig())
    assert parallel_state.get_data_parallel_group() is kept and threads() == count
    init_parallel(ParallelConfig(timeout_minutes=31))
    groups = dist.distributed_c10d._world.pg_map
    assert kept not in groups and parallel_state.get_data_parallel_group() in groups
    assert own in groups
    init_parallel(ParallelConfig())
    dist.destroy_process_group(own)


def test_process_groups_are_destroyed_at_exit(tmp_path):
    """A process that leaves gloo groups alive at exit can abort after its work is done
    ("terminate called without an active exception": torchrun then fails the whole job); every
    tool and the trainer exit through `init_parallel`'s exit handler instead. Exit handlers run
    last registered first, so one registered before `init_parallel` sees what it left."""
    script = tmp_path / "exit.py"
    script.write_text(
        "import atexit\n"
        "import torch.distributed as dist\n"
        "from ark_mega.distributed import ParallelConfig, init_parallel\n"
        "atexit.register(lambda: print('alive at exit:', dist.is_initialized()))\n"
        "init_parallel(ParallelConfig())\n"
        "init_parallel(ParallelConfig())\n"
        "init_parallel(ParallelConfig(timeout_minutes=31))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "alive at exit: False"
