"""The model-family registry: a family registered in one place (here a toy one, reusing the
Whisper encoder, with its own chat template, audio-token rule and Hugging Face layout name)
builds, prompts and converts like the shipped ones; names nobody registered are clear errors."""

import dataclasses

import pytest
import torch

from ark_mega.config import ModelConfig
from ark_mega.convert.hf_folder import config_to_hf
from ark_mega.convert.hf_maps import arkasr_rules, hf_to_megatron, megatron_to_hf
from ark_mega.data.prompts import ChatTemplate
from ark_mega.factory import build_model
from ark_mega.models import AudioLMConfig
from ark_mega.models.audio_encoders import WhisperEncoder
from ark_mega.models.config import (PRESETS, AuTEncoderConfig, DecoderConfig,
                                    WhisperEncoderConfig, tiny_ark_asr)
from ark_mega.models.families import FAMILIES, Family, Layout, family, layout, register
from opd_setup import VOCAB, tokenizer

TOY_TEMPLATE = ChatTemplate(
    prefix="<|im_start|>user\n<|begin_of_audio|>",
    audio_token="<|audio_pad|>",
    suffix="<|end_of_audio|><|im_end|>\n<|im_start|>assistant\n",
    answer="<asr_text>{text}",
)


def toy_audio_tokens(enc: WhisperEncoderConfig, frames: int) -> int:
    # the Whisper encoder's count, written as one division: stride-2 conv, then the merge
    return max(1, (frames + 1) // (2 * enc.merge_factor))


def tiny_toy_asr() -> AudioLMConfig:
    ark = tiny_ark_asr(vocab_size=VOCAB)
    return AudioLMConfig("toy_asr", dataclasses.replace(ark.encoder, merge_factor=2),
                         ark.decoder, ark.audio_token_id)


def tied_only(cfg: AudioLMConfig) -> None:
    if not cfg.decoder.tie_embeddings:
        raise ValueError("toy_asr ties its embeddings")


def toy_family() -> Family:
    return Family(
        name="toy_asr",
        encoder_config=WhisperEncoderConfig,
        encoder=lambda cfg, config, use_te: WhisperEncoder(cfg.encoder, config,
                                                           cfg.decoder.hidden_size, use_te),
        template=TOY_TEMPLATE,
        audio_tokens=toy_audio_tokens,
        layouts=(Layout("toy_hf", arkasr_rules),),
        tiny_preset="tiny_toy_asr",
        validate=tied_only,
    )


@pytest.fixture
def toy():
    PRESETS["tiny_toy_asr"] = tiny_toy_asr
    yield register(toy_family())
    del FAMILIES["toy_asr"], PRESETS["tiny_toy_asr"]


def test_a_registered_family_builds_prompts_and_converts(single_rank, toy, tmp_path):
    tok = tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    model, prompts = build_model(ModelConfig(toy.tiny_preset, tokenizer=str(tmp_path)),
                                 torch.float32)
    cfg = model.cfg
    assert cfg.family == "toy_asr" and isinstance(model.encoder, WhisperEncoder)
    assert AudioLMConfig.from_dict(cfg.to_dict()) == cfg

    # prompts: the toy template, its audio token, and its rule at the model's merge factor (2)
    assert prompts.template is TOY_TEMPLATE
    assert cfg.audio_token_id == prompts.audio_id == tok.token_to_id("<|audio_pad|>")
    p = prompts.build(161, "hello world")
    prefix = tok.encode(TOY_TEMPLATE.prefix, add_special_tokens=False).ids
    assert p.input_ids[:len(prefix)] == prefix
    assert p.num_audio == p.input_ids.count(prompts.audio_id) == 40  # (161 + 1) // 4
    assert p.input_ids[p.num_prompt] == tok.token_to_id("<asr_text>")
    assert p.input_ids[-1] == tok.token_to_id("<|im_end|>")

    # the encoder makes exactly as many audio embeddings as the prompt has placeholders
    gen = torch.Generator().manual_seed(0)
    frames = [1, 9, 161]
    feats = [torch.randn(cfg.encoder.num_mel_bins, n, generator=gen) for n in frames]
    with torch.no_grad():
        _, counts = model.encoder(feats)
        logits = model(torch.tensor([p.input_ids]), feats[2:])
    assert counts == [prompts.audio_tokens(n) for n in frames] == [1, 2, 40]
    assert logits.shape == (len(p.input_ids), 1, VOCAB)

    # its layout: Ark-ASR's tensor names, round trip through megatron shards unchanged
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hf = megatron_to_hf({(0, 0): state}, "toy_hf", cfg)
    assert torch.equal(hf["audio_encoder.whisper.conv1.weight"], state["encoder.conv1.weight"])
    assert hf["audio_encoder.adapting.0.weight"].shape[1] == 2 * cfg.encoder.hidden_size
    back = hf_to_megatron(hf, "toy_hf", cfg)[(0, 0)]
    assert set(back) == set(state)
    assert all(torch.equal(back[k], v) for k, v in state.items())
    again = megatron_to_hf(hf_to_megatron(hf, "toy_hf", cfg, 2, 2), "toy_hf", cfg, 2, 2)
    assert set(again) == set(hf) and all(torch.equal(again[k], v) for k, v in hf.items())
    assert layout("toy_hf").rules is arkasr_rules and toy.export_layouts == ()
    with pytest.raises(ValueError, match="cannot export to layout 'toy_hf'"):
        config_to_hf(cfg, "toy_hf")


def test_a_family_checks_its_configs(toy):
    enc, dec = tiny_toy_asr().encoder, tiny_toy_asr().decoder
    with pytest.raises(TypeError, match="toy_asr needs a WhisperEncoderConfig"):
        AudioLMConfig("toy_asr", AuTEncoderConfig(), dec)
    with pytest.raises(ValueError, match="toy_asr ties its embeddings"):
        AudioLMConfig("toy_asr", enc, dataclasses.replace(dec, tie_embeddings=False))
    with pytest.raises(ValueError, match="output_dim \\(64\\) must equal the decoder's "
                                         "hidden_size \\(48\\)"):
        AudioLMConfig("qwen3_asr", AuTEncoderConfig(output_dim=64), DecoderConfig(hidden_size=48))
    with pytest.raises(ValueError, match="model family 'toy_asr' is already registered"):
        register(toy_family())
    taken = dataclasses.replace(toy_family(), name="other_asr",
                                layouts=(Layout("glmasr", arkasr_rules),))
    with pytest.raises(ValueError, match="\\['glmasr'\\] already belong to another family"):
        register(taken)
    assert "other_asr" not in FAMILIES


def test_unknown_names_are_errors_naming_the_known_ones():
    known = "known: \\['ark_asr', 'qwen3_asr'\\]"
    with pytest.raises(ValueError, match=f"unknown model family 'toy_asr'; {known}"):
        family("toy_asr")
    with pytest.raises(ValueError, match=f"unknown model family 'whisper_asr'; {known}"):
        AudioLMConfig("whisper_asr", WhisperEncoderConfig(), DecoderConfig())
    saved = tiny_ark_asr().to_dict()
    with pytest.raises(ValueError, match=f"unknown model family 'whisper_asr'; {known}"):
        AudioLMConfig.from_dict({**saved, "family": "whisper_asr"})
    with pytest.raises(ValueError, match="unknown Hugging Face layout 'toy_hf'; known: "
                                         "\\['arkasr', 'glmasr', 'qwen3_asr', 'qwen3_asr_thinker'\\]"):
        layout("toy_hf")
