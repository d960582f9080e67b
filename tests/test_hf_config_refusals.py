"""A Hugging Face config asking for attention our models do not compute is refused on import,
naming the key, rather than imported as a different model."""

import copy

import pytest

from ark_mega.convert.hf_configs import (UnsupportedConfig, arkasr_config, glmasr_config,
                                         qwen3_asr_config)
from ark_mega.convert.hf_folder import config_from_hf
from ark_mega.models import preset


LAYOUTS = ["glmasr", "arkasr", "qwen3_asr", "qwen3_asr_thinker"]


def configs() -> dict:
    """Each layout's config.json as the exports (and transformers) write it, and the original
    qwen-asr one: `thinker_config`, transformers 4 keys, multimodal RoPE fields."""
    qwen3 = qwen3_asr_config(preset("tiny_qwen3_asr")).to_dict()
    thinker = copy.deepcopy(qwen3)
    text = thinker["text_config"]
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]
    text["rope_scaling"] = {"interleaved": True, "mrope_interleaved": True,
                            "mrope_section": [2, 1, 1], "rope_type": "default", "type": "default"}
    return {"glmasr": glmasr_config(preset("tiny_ark_asr")).to_dict(),
            "arkasr": arkasr_config(preset("tiny_ark_asr")),
            "qwen3_asr": qwen3, "qwen3_asr_thinker": {"thinker_config": thinker}}


def text_of(hf: dict) -> dict:
    inner = hf.get("thinker_config", hf)
    return inner.get("text_config", inner)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_normal_configs_import(layout):
    hf = configs()[layout]
    # Qwen2 configs name a window size even with sliding windows off
    text_of(hf).update(use_sliding_window=False, sliding_window=32768, max_window_layers=28)
    cfg, got = config_from_hf(hf)
    assert got == layout
    assert cfg.decoder.rotary_base == (5000000.0 if cfg.family == "qwen3_asr" else 10000.0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("key,value", [
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "mrope_section": [2, 1, 1]}),
])
def test_scaled_rope_is_refused(layout, key, value):
    hf = configs()[layout]
    text_of(hf)[key] = value
    field = "rope_type" if "rope_type" in value else "type"
    kind = value[field]
    with pytest.raises(UnsupportedConfig, match=f"text model {key}.{field} = '{kind}'"):
        config_from_hf(hf)


def test_glmasr_encoder_rope_scaling_is_refused():
    hf = configs()["glmasr"]
    hf["audio_config"]["rope_parameters"]["rope_type"] = "linear"
    with pytest.raises(UnsupportedConfig,
                       match="audio encoder rope_parameters.rope_type = 'linear'"):
        config_from_hf(hf)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("change,message", [
    ({"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 2},
     "use_sliding_window = true \\(sliding_window 4096\\)"),
    ({"partial_rotary_factor": 0.25}, "text model partial_rotary_factor = 0.25"),
], ids=["sliding_window", "partial_rotary"])
def test_text_attention_our_decoders_do_not_compute_is_refused(layout, change, message):
    hf = configs()[layout]
    text_of(hf).update(change)
    with pytest.raises(UnsupportedConfig, match=message):
        config_from_hf(hf)
