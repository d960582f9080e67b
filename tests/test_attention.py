"""Packed (THD) attention: host boundaries read once, RoPE applied in the core attention as
megatron's attention would, and the GPU's variable-length flash attention equal to the
per-segment SDPA path (forward and backward)."""

import pytest
import torch

from ark_mega.distributed import device
from ark_mega.models import AudioLM
from ark_mega.models.attention import PackedSegments, _varlen_probe, per_segment_attention
from ark_mega.models.attention import varlen_attention
from ark_mega.models.audio_encoders import packed_seq_params
from ark_mega.models.config import tiny_ark_asr
from hf_reference import make_utterances
from parity import packed_batch


def test_packed_segments_carry_their_boundaries_on_the_host():
    params = packed_seq_params(torch.tensor([0, 3, 10, 12]))
    assert isinstance(params, PackedSegments) and params.boundaries == (0, 3, 10, 12)
    assert params.max_seqlen_q == params.max_seqlen_kv == 7
    assert params.cu_seqlens_q.dtype == torch.int32


def packed_on(device, cfg) -> dict:
    """A packed batch of three utterances (tests/parity.py's) on `device`."""
    batch = packed_batch(make_utterances(cfg, [64, 47, 79], [5, 11, 2], seed=0))
    return {k: [f.to(device) for f in v] if isinstance(v, list) else v.to(device)
            for k, v in batch.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rope_in_the_core_attention_equals_megatrons(single_rank, dtype):
    """With local layers the core attention rotates packed queries and keys, from tables looked
    up once per forward (megatron's attention would read the boundaries to the host in every
    layer): the same logits and gradients in the Whisper encoder (partial rotary) and the
    decoder. Bitwise on the CPU (the same torch ops); on a GPU the kernel rounds once where the
    ops round at each step."""
    cfg = tiny_ark_asr()
    torch.manual_seed(0)
    model = AudioLM(cfg, dtype=dtype).to(device())
    batch = packed_on(device(), cfg)

    def run(in_core_attention: bool):
        model.rope_in_core_attention = model.encoder.rope_in_core_attention = in_core_attention
        model.zero_grad()
        logits = model(batch["input_ids"], batch["audio_features"], cu_seqlens=batch["cu_seqlens"])
        logits.float().square().mean().backward()
        return [t.float().cpu() for t in (logits, *(p.grad for p in model.parameters()))]

    for ours, theirs in zip(run(True), run(False)):
        if device().type == "cpu":
            assert torch.equal(ours, theirs)
        else:  # relative to the tensor's norm: bf16 rounding moves single small entries far
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            assert (ours - theirs).norm() <= tol * theirs.norm()


def test_a_packed_forward_and_backward_reads_the_device_once_per_stack(single_rank, host_reads):
    """A read of a device tensor on the host waits for the GPU. The segment boundaries are read
    once per stack (Whisper encoder, decoder) and nothing per layer: 2 and 4 layers read as
    often (megatron's packed RoPE read 4 times per layer)."""
    for layers in (2, 4):
        cfg = tiny_ark_asr()
        cfg.encoder.num_layers = cfg.decoder.num_layers = layers
        model = AudioLM(cfg).to(device())
        batch = packed_on(device(), cfg)
        host_reads.clear()
        logits = model(batch["input_ids"], batch["audio_features"], cu_seqlens=batch["cu_seqlens"])
        logits.square().mean().backward()
        assert host_reads == ["tolist", "tolist"], (layers, host_reads)


def test_per_segment_attention_keeps_segments_apart():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, n, 8, generator=gen) for n in (4, 2, 2))
    both = per_segment_attention(q, k, v, [0, 4, 9], [0, 4, 9], True, None)
    alone = per_segment_attention(q[4:], k[4:], v[4:], [0, 5], [0, 5], True, None)
    assert torch.allclose(both[4:], alone, atol=1e-6)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_varlen_probe_answers_the_same_when_first_called_without_grad(monkeypatch, mode):
    """A rollout's encoder is the first packed attention of an OPD run: a probe that needs
    autograd must not conclude "unusable" there for the whole run. The varlen call is stood in
    for by the per-segment path (CUDA-only); a wrong one must still be refused."""
    import ark_mega.models.attention as attention

    def same(q, k, v, cu, bounds, causal, scale):
        return per_segment_attention(q, k, v, bounds, bounds, causal, scale)

    monkeypatch.setattr(attention, "varlen_attention", same)
    with mode():
        assert _varlen_probe.__wrapped__(torch.device("cpu"), torch.float32, None)
    monkeypatch.setattr(attention, "varlen_attention", lambda *a: same(*a) * 1.5)
    with mode(), pytest.warns(UserWarning, match="not usable"):
        assert not _varlen_probe.__wrapped__(torch.device("cpu"), torch.float32, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="variable-length flash attention is CUDA-only")
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_equals_per_segment_on_the_gpu(causal):
    dev, dtype = torch.device("cuda"), torch.bfloat16
    if not _varlen_probe(dev, dtype, None):
        pytest.skip("this torch has no usable variable-length flash attention")
    bounds = [0, 375, 400, 1150, 1500]
    cu = torch.tensor(bounds, dtype=torch.int32, device=dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randn(1500, n, 64, generator=gen, device=dev, dtype=dtype).requires_grad_()
               for n in (14, 2, 2))
    got = varlen_attention(q, k, v, cu, bounds, causal, None)
    g = torch.randn(got.shape, generator=gen, device=dev, dtype=dtype)
    grads = torch.autograd.grad((got * g).sum(), (q, k, v))
    ref = per_segment_attention(q, k, v, bounds, bounds, causal, None)
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip((got, *grads), (ref, *ref_grads)):
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert rel < 1e-2, rel
