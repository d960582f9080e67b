"""Megatron tensor layouts: fused QKV by query group, fused gate/up, TP shards, PP stages.

Everything here is a pure function on tensors, so each direction can be checked against the
other (tests/test_convert.py round-trips them bit-exactly).
"""

from __future__ import annotations

import torch

# How one logical tensor is split over tensor-parallel ranks.
REPLICATED = "replicated"  # norms, row-parallel biases, conv front ends
COLUMN = "column"  # output dim (dim 0) split: column-parallel weights and biases, vocab
ROW = "row"  # input dim (dim 1) split: row-parallel weights
GLU = "glu"  # fused [gate; up], each half split along dim 0, then re-fused per rank


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
             num_groups: int, head_dim: int) -> torch.Tensor:
    """[q; k; v] (HF order) -> megatron's fused layout, per query group [q heads | k | v]."""
    rest = q.shape[1:]
    per_group = num_heads // num_groups
    q = q.reshape(num_groups, per_group, head_dim, *rest)
    k = k.reshape(num_groups, 1, head_dim, *rest)
    v = v.reshape(num_groups, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Inverse of `fuse_qkv`."""
    rest = qkv.shape[1:]
    per_group = num_heads // num_groups
    grouped = qkv.reshape(num_groups, per_group + 2, head_dim, *rest)
    q = grouped[:, :per_group].reshape(-1, *rest)
    k = grouped[:, per_group].reshape(-1, *rest)
    v = grouped[:, per_group + 1].reshape(-1, *rest)
    return q, k, v


def shard(t: torch.Tensor, kind: str, rank: int, size: int) -> torch.Tensor:
    """The part of the full tensor `t` that tensor-parallel rank `rank` of `size` holds.

    A fused QKV tensor shards as COLUMN: its query groups are contiguous, so an even split of
    dim 0 gives each rank whole groups.
    """
    if kind == REPLICATED or size == 1:
        return t.clone()
    if kind == COLUMN:
        return _even_chunks(t, 0, size, rank).clone()
    if kind == ROW:
        return _even_chunks(t, 1, size, rank).clone()
    if kind == GLU:
        gate, up = t.chunk(2, dim=0)
        return torch.cat([_even_chunks(gate, 0, size, rank), _even_chunks(up, 0, size, rank)])
    raise ValueError(f"unknown sharding kind {kind!r}")


def unshard(parts: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Inverse of `shard` over all ranks' parts, in rank order."""
    if kind == REPLICATED or len(parts) == 1:
        return parts[0].clone()
    if kind == COLUMN:
        return torch.cat(parts, dim=0)
    if kind == ROW:
        return torch.cat(parts, dim=1)
    if kind == GLU:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    raise ValueError(f"unknown sharding kind {kind!r}")


def _even_chunks(t: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"dimension {dim} of a {tuple(t.shape)} tensor does not split into "
                         f"{size} tensor-parallel shards")
    return t.chunk(size, dim=dim)[rank]


def stage_of_layer(layer: int, num_layers: int, pp_size: int) -> tuple[int, int]:
    """(pipeline stage, local index) of global decoder layer `layer` (even split)."""
    if num_layers % pp_size:
        raise ValueError(f"{num_layers} decoder layers do not split into {pp_size} pipeline stages")
    per_stage = num_layers // pp_size
    return layer // per_stage, layer % per_stage
