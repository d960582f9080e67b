"""Model pieces that the parity tests do not isolate."""

import pytest
import torch

from ark_mega.models import AudioLM, preset
from ark_mega.audio_tokens import aut_audio_tokens, whisper_audio_tokens
from conftest import load_tool


@pytest.fixture(scope="module")
def student(single_rank):
    torch.manual_seed(0)
    return AudioLM(preset("tiny_ark_asr"))


def test_whisper_token_count_rule_matches_the_encoder(student):
    gen = torch.Generator().manual_seed(0)
    frames = [1, 2, 7, 8, 9, 15, 16, 17, 33, 160]
    feats = [torch.randn(16, n, generator=gen) for n in frames]
    _, counts = student.encoder(feats)
    assert counts == [whisper_audio_tokens(n) for n in frames]
    assert counts[:3] == [1, 1, 1]  # shorter than one merge group: padded up to one token
    assert whisper_audio_tokens(3000) == 375  # 30 s at 12.5 tokens per second


def test_utterances_do_not_interact_in_the_encoder(student):
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 40, generator=gen), torch.randn(16, 90, generator=gen)
    with torch.no_grad():
        alone, _ = student.encoder([a])
        together, counts = student.encoder([a, b])
    assert torch.allclose(together[: counts[0]], alone, atol=1e-6)


def test_encoder_rejects_audio_past_30_seconds(student):
    with pytest.raises(ValueError, match="at most 1500"):
        student.encoder([torch.zeros(16, 3002)])


def test_key_bias_stays_zero_and_untrained(student):
    qkv = student.encoder.block.layers[0].self_attention.linear_qkv
    feats = [torch.randn(16, 48)]
    before, _ = student.encoder(feats)
    key = qkv.bias_mask == 0
    assert key.sum() == 32  # one key head-block of 8 per head, 4 heads
    with torch.no_grad():
        qkv.bias[key] = 5.0  # whatever sits there has no effect
    after, _ = student.encoder(feats)
    assert torch.allclose(before, after)
    after.sum().backward()
    assert torch.all(qkv.bias.grad[key] == 0) and qkv.bias.grad[~key].abs().sum() > 0
    with torch.no_grad():
        qkv.bias[key] = 0.0
    student.zero_grad()


def test_aut_token_count_matches_transformers():
    from transformers.models.qwen3_asr.modeling_qwen3_asr import _get_feat_extract_output_lengths

    frames = torch.arange(1, 3001)
    expected = _get_feat_extract_output_lengths(frames, 50)
    assert [aut_audio_tokens(int(n)) for n in frames] == expected.tolist()


def test_placeholder_count_must_match_audio(student):
    cfg = student.cfg
    ids = torch.tensor([[1, 2, cfg.audio_token_id, 3]])
    with pytest.raises(ValueError, match="1 audio placeholder tokens for 8 audio embeddings"):
        student(ids, [torch.randn(16, 64)])


def test_real_presets_have_transformers_parameter_counts(single_rank):
    sizes = load_tool("model_sizes")
    for name in ("ark_asr_0p6b", "qwen3_asr_0p6b", "qwen3_asr_1p7b"):
        cfg = preset(name)
        assert sizes.our_count(cfg) == sizes.hf_count(cfg), name
    assert 0.55e9 < sizes.our_count(preset("ark_asr_0p6b")) < 0.65e9


@pytest.mark.parametrize("name", ["tiny_ark_asr", "tiny_qwen3_asr"])
def test_a_bf16_model_has_one_dtype(single_rank, name):
    """megatron's norms make fp32 weights whatever params_dtype says; a mixed model breaks the
    optimizers' checkpoints and torch's fused RMSNorm."""
    model = AudioLM(preset(name), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_transformer_impl_and_fp8_settings(single_rank):
    from ark_mega.models.specs import use_transformer_engine

    assert use_transformer_engine("local", None) is False
    model = AudioLM(preset("tiny_ark_asr"), transformer_impl="local")
    assert model.transformer_impl == "local"
    with pytest.raises(ValueError, match="transformer_impl='te'"):
        use_transformer_engine("te", None)
    with pytest.raises(ValueError, match="fp8='fp4'"):
        use_transformer_engine("local", "fp4")
    with pytest.raises(ValueError, match="fp8=hybrid: FP8 needs transformer_impl=transformer_engine"):
        use_transformer_engine("local", "hybrid")
    if not torch.cuda.is_available():  # no TE without CUDA: each TE request names why
        with pytest.raises(ValueError, match="transformer_impl=transformer_engine: CUDA is not"
                                             "|Transformer Engine is not installed"):
            use_transformer_engine("transformer_engine", None)
        with pytest.raises(ValueError, match="fp8=e4m3: FP8 needs Transformer Engine layers"):
            use_transformer_engine("auto", "e4m3")
        assert use_transformer_engine("auto", None) is False
