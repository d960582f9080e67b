"""Joint CTC / attention SFT (sft.ctc_weight): the loss, its head, loading across stages and
export without the head."""

import pytest
import torch
import torch.nn.functional as F

from ark_mega import checkpoint
from ark_mega.config import load_config
from ark_mega.data import PromptBuilder
from ark_mega.models import AudioLM, preset
from ark_mega.opd.steps import JointCTC, sft_step
from safetensors.torch import load_file
from test_hf_io import ok
from opd_setup import VOCAB, batch, model, tokenizer


@pytest.mark.parametrize("name", ["tiny_ark_asr", "tiny_qwen3_asr"])
def test_joint_loss_is_the_weighted_sum_of_cross_entropy_and_per_utterance_ctc(single_rank, name):
    tok = tokenizer()
    sp = PromptBuilder.for_model(tok, preset(name))
    m = model(name, sp, seed=0)
    torch.manual_seed(1)
    with_head = AudioLM(m.cfg, ctc_head=True)
    with_head.load_state_dict(m.state_dict(), strict=False)  # same weights, plus the head
    b = batch(sp, n=3)
    plain = sft_step(m, [b])
    joint = JointCTC(0.3, sp.encode)
    got = sft_step(with_head, [b], joint)
    assert got["ce_loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert got["loss"] == pytest.approx(0.7 * got["ce_loss"] + 0.3 * got["ctc_loss"], rel=1e-5)
    # the reference: torch's CTC utterance by utterance, summed, per scored token (as the CE)
    with torch.no_grad():
        _, audio, counts = with_head.embed(b.input_ids, b.audio_features)
        logits = with_head.ctc_head(audio).log_softmax(-1)
    total = 0
    for lp, text in zip(logits.split(counts), b.texts):
        target = torch.tensor(sp.encode(text))
        assert 0 < len(target) <= lp.shape[0]
        total += F.ctc_loss(lp[:, None], target[None], [lp.shape[0]], [len(target)],
                            blank=VOCAB, reduction="sum")
    assert got["tokens"] == plain["tokens"] == int(b.loss_mask.sum())
    assert got["ctc_loss"] == pytest.approx((total / got["tokens"]).item(), rel=1e-4)
    assert with_head.ctc_head.weight.grad.abs().sum() > 0
    assert with_head.ctc_head.weight.shape == (VOCAB + 1, m.cfg.decoder.hidden_size)


def test_ctc_head_loads_optionally_and_is_not_exported(single_rank, tmp_path):
    sp = PromptBuilder.student(tokenizer())
    plain = model("tiny_ark_asr", sp, seed=0)
    checkpoint.save(str(tmp_path / "plain"), 0, plain)
    torch.manual_seed(5)
    with_head = AudioLM(plain.cfg, ctc_head=True)
    head = with_head.ctc_head.weight.detach().clone()
    with pytest.raises(ValueError, match="lacks 2 of the model's tensors, e.g. ctc_head.weight"):
        checkpoint.load(str(tmp_path / "plain"), with_head)
    checkpoint.load(str(tmp_path / "plain"), with_head, optional=("ctc_head.",))
    assert torch.equal(with_head.ctc_head.weight, head)  # kept its initialisation
    assert torch.equal(with_head.gpt.embedding.word_embeddings.weight,
                       plain.gpt.embedding.word_embeddings.weight)
    # a checkpoint with the head loads into a model without one (the next stage, inference)
    with torch.no_grad():
        with_head.ctc_head.weight.add_(1.0)
        with_head.gpt.embedding.word_embeddings.weight.mul_(2.0)
    checkpoint.save(str(tmp_path / "joint"), 0, with_head)
    fresh = model("tiny_ark_asr", sp, seed=1)
    checkpoint.load(str(tmp_path / "joint"), fresh)
    assert torch.equal(fresh.gpt.embedding.word_embeddings.weight,
                       with_head.gpt.embedding.word_embeddings.weight)
    # export reads the tensors its layout maps: the head stays behind
    sp.tokenizer.save(str(tmp_path / "tokenizer.json"))
    ok("export", tmp_path / "joint", tmp_path / "hf", "--layout", "glmasr", "--tokenizer", tmp_path)
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert exported and not [k for k in exported if "ctc" in k]


@pytest.mark.parametrize("override,message", [
    (["stage=opd", "teacher.preset=tiny_qwen3_asr", "sft.ctc_weight=0.3"], "not opd"),
    (["stage=sft", "parallel.pipeline_parallel=2", "sft.ctc_weight=0.3"], "pipeline_parallel 1"),
    (["stage=sft", "sft.ctc_weight=1.0"], r"\[0, 1\)"),
])
def test_ctc_settings_are_checked(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, override)
