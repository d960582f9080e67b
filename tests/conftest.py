import os
import sys

# Test helpers (hf_reference.py, parity.py) are imported by name, in-process and under torchrun.
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def single_rank():
    """torch.distributed + megatron parallel state as one process (TP = PP = 1)."""
    from ark_mega.distributed import ParallelConfig, init_parallel

    init_parallel(ParallelConfig())
    yield
