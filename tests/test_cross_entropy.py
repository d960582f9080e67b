"""SFT's linear cross-entropy (output layer fused, a chunk of positions at a time, gradients
formed in the forward pass) against the plain computation in float64: loss and both
gradients; TP = 2 in tests/dist_kernels.py."""

import pytest
import torch
import torch.nn.functional as F

from ark_mega.cross_entropy import chunk_rows, linear_cross_entropy


def _inputs(dtype, t=37, h=16, v=50):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(t, h, generator=gen).to(dtype)
    weight = torch.randn(v, h, generator=gen).to(dtype)
    labels = torch.randint(0, v, (t,), generator=gen)
    mask = torch.rand(t, generator=gen) < 0.7  # a loss mask: some positions not scored
    return hidden, weight, labels, mask


def _plain(hidden, weight, labels, mask, scale):
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss = (F.cross_entropy(h @ w.t(), labels, reduction="none") * mask).sum()
    (loss * scale).backward()
    return loss, h.grad, w.grad


@pytest.mark.parametrize("rows", [1, 5, 37, 64])
def test_equals_plain_in_fp32(rows):
    hidden, weight, labels, mask = _inputs(torch.float32)
    ref_loss, ref_h, ref_w = _plain(hidden, weight, labels, mask, 0.3)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, mask, rows=rows)
    (loss * 0.3).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), ref_w, atol=1e-5, rtol=1e-5)


def test_bf16_matches_the_plain_bf16_path():
    """In bf16 the loss is the plain path's (bf16 logits, float32 cross-entropy) and the
    gradients agree up to bf16 rounding, each chunk's weight gradient summed in float32."""
    hidden, weight, labels, mask = _inputs(torch.bfloat16, t=300, h=32, v=500)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain = (F.cross_entropy((h1 @ w1.t()).float(), labels, reduction="none") * mask).sum()
    plain.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h2, w2, labels, mask, rows=64)
    loss.backward()
    assert h2.grad.dtype == w2.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, plain, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(h2.grad.float(), h1.grad.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(w2.grad.float(), w1.grad.float(), atol=2e-2, rtol=2e-2)


def test_no_gradients_formed_without_grad():
    hidden, weight, labels, mask = _inputs(torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, mask, rows=5)
    ref, _, _ = _plain(hidden, weight, labels, mask, 1.0)
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-5, rtol=1e-5)


def test_chunk_holds_a_bounded_slice_of_logits():
    assert chunk_rows(151_936) == 441  # 256 MiB of float32 logits per chunk at Qwen's vocabulary
    assert chunk_rows(10**9) == 1


def test_shapes_are_checked():
    hidden, weight, labels, mask = _inputs(torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(hidden, weight[:, :8], labels, mask)
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(hidden, weight, labels, mask[:-1])


def test_sft_step_is_the_cross_entropy_of_the_answer_positions_only(single_rank, monkeypatch):
    """The SFT loss and gradients are those of the full logits' cross-entropy at the answer
    tokens; the output layer runs at those positions alone (a packed ASR batch is mostly audio
    and prompt positions)."""
    from ark_mega.data import PromptBuilder
    from ark_mega.opd import steps
    from opd_setup import batch, model, tokenizer

    sp = PromptBuilder.student(tokenizer())
    m = model("tiny_ark_asr", sp, seed=0)
    b = batch(sp, n=3)
    rows = []
    def spy(hidden, *args):
        rows.append(hidden.shape[0])
        return linear_cross_entropy(hidden, *args)

    monkeypatch.setattr(steps, "linear_cross_entropy", spy)
    got = steps.sft_step(m, [b])
    ours = {n: p.grad.clone() for n, p in m.named_parameters()}
    mask = b.loss_mask[0]
    assert rows == [int(mask.sum())] and rows[0] < mask.numel() / 2
    m.zero_grad()
    logits = m(b.input_ids, b.audio_features, cu_seqlens=b.cu_seqlens)[:, 0]
    loss = F.cross_entropy(logits[mask].float(), b.labels[0][mask])
    loss.backward()
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for n, p in m.named_parameters():
        assert torch.allclose(ours[n], p.grad, rtol=1e-4, atol=1e-6), n
