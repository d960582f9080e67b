"""The CPU adapter for megatron-core, one test per patched site (ark_mega/distributed.py)."""

import pytest
import torch
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


def test_site3_schedule_literals_land_on_cpu(single_rank):
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.float32 is torch.float32


def test_site4_cuda_moves_are_scoped_to_the_tied_embedding_setup(single_rank):
    assert getattr(language_module.LanguageModule.setup_embeddings_and_output_layer,
                   "__ark_cpu_adapted__", False)
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1).cuda()  # not patched outside that one function


def test_site5_synchronize_is_a_no_op(single_rank):
    torch.cuda.synchronize()


def test_world_size_must_fit_the_layout(single_rank):
    with pytest.raises(ValueError, match="not divisible"):
        init_parallel(ParallelConfig(tensor_parallel=2))
    init_parallel(ParallelConfig())
