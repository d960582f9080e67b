"""RoPE of packed (THD) sequences, forward and backward, one launch each.

megatron's unfused RoPE for packed input reads the segment lengths to the host in every layer
(for queries and keys: each read waits for the GPU), concatenates the segments' angles, takes
their cos and sin, and rotates with ~8 elementwise kernels, again in the backward. Here the
tables are looked up once per forward, for every token at its position within its segment
(`rope_tables` then `tables_at`), and each rotation is one kernel: x [t, heads, hn] rotated on
its first `rot` dims, the rest passed through. The backward is the rotation by the opposite
angle. Non-interleaved (half-split) RoPE, as megatron's:
x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import next_pow2, use_triton


def rope_tables(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_len, rot] of megatron's rotary angles [max_len, 1, 1, rot], in the
    activations' dtype (megatron casts them so before use)."""
    angles = freqs.reshape(freqs.shape[0], -1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def tables_at(cos: torch.Tensor, sin: torch.Tensor, boundaries: tuple[int, ...]):
    """The tables [t, rot] at each token's position within its segment (positions restart at
    every boundary; `boundaries` are on the host, so nothing waits for the device)."""
    positions = torch.cat([torch.arange(b - a) for a, b in zip(boundaries, boundaries[1:])])
    positions = positions.to(cos.device, non_blocking=True)
    return cos.index_select(0, positions), sin.index_select(0, positions)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference: megatron's torch ops (same order, so the same rounding) on the last dim;
    `cos` / `sin` broadcast against x[..., :rot]."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    return torch.cat((x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin, x_pass), dim=-1)


@triton.jit(do_not_specialize=["n"])
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n, x_st, x_sh, hn, rot,
                 BLOCK_T: tl.constexpr, HALF: tl.constexpr, REST: tl.constexpr,
                 INVERSE: tl.constexpr):
    """Program (block of tokens, head). Forward: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2; the
    inverse (the backward's transpose): y1 = x1 c1 + x2 s2, y2 = x2 c2 - x1 s1. fp32 inside,
    one rounding to the output dtype."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    heads = tl.num_programs(1)
    half = rot // 2
    i = tl.arange(0, HALF)
    in_rows = rows[:, None] < n
    m = in_rows & (i[None, :] < half)
    src = x_ptr + rows[:, None].to(tl.int64) * x_st + head * x_sh
    x1 = tl.load(src + i[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + i[None, :], mask=m, other=0.0).to(tl.float32)
    tab = rows[:, None].to(tl.int64) * rot + i[None, :]
    c1 = tl.load(cos_ptr + tab, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + half + tab, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + tab, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + half + tab, mask=m, other=0.0).to(tl.float32)
    if INVERSE:
        y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    dst = out_ptr + (rows[:, None].to(tl.int64) * heads + head) * hn
    dtype = out_ptr.dtype.element_ty
    tl.store(dst + i[None, :], y1.to(dtype), mask=m)
    tl.store(dst + half + i[None, :], y2.to(dtype), mask=m)
    j = rot + tl.arange(0, REST)  # dims past the rotary part pass unchanged
    mj = in_rows & (j[None, :] < hn)
    tl.store(dst + j[None, :], tl.load(src + j[None, :], mask=mj), mask=mj)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    n, heads, hn = x.shape
    rot = cos.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    half = next_pow2(rot // 2)
    block_t = max(1, 1024 // half)  # six [BLOCK_T, HALF] fp32 tiles: ~48 registers a thread
    _rope_kernel[(triton.cdiv(n, block_t), heads)](
        x, cos, sin, out, n, x.stride(0), x.stride(1), hn, rot, BLOCK_T=block_t,
        HALF=half, REST=next_pow2(max(hn - rot, 1)), INVERSE=inverse)
    return out


class _PackedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _launch(grad, cos, sin, inverse=True), None, None


def packed_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                impl: str = "auto") -> torch.Tensor:
    """x [t, heads, hn] (any strides, contiguous head dims for the kernel) rotated on its first
    `rot` dims by the per-token tables `cos`, `sin` [t, rot] (from `tables_at`); differentiable
    in x. Returns a new contiguous [t, heads, hn]."""
    rot = cos.shape[-1]
    if rot % 2 or rot > x.shape[-1] or cos.shape[0] != x.shape[0]:
        raise ValueError(f"tables [{cos.shape[0]}, {rot}] do not fit x {list(x.shape)}: one row "
                         f"per token, an even rotary width at most the head width")
    if not use_triton(impl, x):
        return rotate(x, cos[:, None], sin[:, None])
    return _PackedRope.apply(x, cos.contiguous(), sin.contiguous())
