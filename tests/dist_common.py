"""The end of every torchrun check script: one exit code for all ranks."""

import torch
import torch.distributed as dist

from ark_mega.distributed import destroy_parallel


def finish(ok: bool) -> int:
    """0 when every rank passed, 1 otherwise (on every rank); tears the groups down."""
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    destroy_parallel()
    return int(flag.item() > 0)
