"""HF <-> megatron weight maps: bit-exact round trips at every TP / PP layout, clear errors."""

import pytest
import torch

from ark_mega.convert.hf_configs import glmasr_config
from ark_mega.convert.hf_maps import hf_to_megatron, load_shard, megatron_to_hf
from ark_mega.convert.sharding import COLUMN, GLU, ROW, fuse_qkv, shard, split_qkv, unshard
from ark_mega.models import AudioLM, preset
from hf_reference import LAYOUT, build_hf_model

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module", params=["tiny_ark_asr", "tiny_qwen3_asr"])
def hf(request):
    cfg = preset(request.param)
    return cfg, build_hf_model(cfg).state_dict()


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_round_trip_is_bit_exact(hf, tp, pp):
    cfg, sd = hf
    shards = hf_to_megatron(sd, LAYOUT[cfg.family], cfg, tp, pp)
    assert set(shards) == {(t, p) for t in range(tp) for p in range(pp)}
    back = megatron_to_hf(shards, LAYOUT[cfg.family], cfg, tp, pp)
    assert set(back) == set(sd)
    for name, tensor in sd.items():
        assert torch.equal(back[name], tensor), name


def test_untied_embeddings_round_trip():
    cfg = preset("tiny_ark_asr")
    cfg.decoder.tie_embeddings = False
    sd = build_hf_model(cfg).state_dict()
    assert not torch.equal(sd["lm_head.weight"], sd["model.language_model.embed_tokens.weight"])
    shards = hf_to_megatron(sd, "glmasr", cfg, 2, 2)
    assert "gpt.output_layer.weight" in shards[(0, 1)]
    back = megatron_to_hf(shards, "glmasr", cfg, 2, 2)
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_shards_fit_the_model(single_rank, hf):
    cfg, sd = hf
    model = AudioLM(cfg)
    load_shard(model, hf_to_megatron(sd, LAYOUT[cfg.family], cfg)[(0, 0)])
    bad = dict(hf_to_megatron(sd, LAYOUT[cfg.family], cfg)[(0, 0)])
    bad["gpt.decoder.final_layernorm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="final_layernorm.weight: shard has shape"):
        load_shard(model, bad)
    del bad["gpt.decoder.final_layernorm.weight"]
    with pytest.raises(KeyError, match="missing"):
        load_shard(model, bad)


def test_missing_and_unexpected_tensors_are_named(hf):
    cfg, sd = hf
    layout = LAYOUT[cfg.family]
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    with pytest.raises(KeyError, match=f"'{name}' is missing"):
        hf_to_megatron({k: v for k, v in sd.items() if k != name}, layout, cfg)
    with pytest.raises(KeyError, match="unexpected tensor.*'model.extra.weight'"):
        hf_to_megatron({**sd, "model.extra.weight": torch.zeros(1)}, layout, cfg)


def test_tied_config_rejects_a_different_lm_head():
    cfg = preset("tiny_ark_asr")
    sd = dict(build_hf_model(cfg).state_dict())
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        hf_to_megatron(sd, "glmasr", cfg)


def test_glmasr_cannot_express_other_merge_widths():
    cfg = preset("tiny_ark_asr")
    cfg.encoder.ffn_hidden_size = 96
    with pytest.raises(ValueError, match="ffn_hidden_size == merge_factor"):
        glmasr_config(cfg)


def test_qkv_is_fused_per_query_group():
    heads, groups, hd = 4, 2, 3
    q = torch.arange(heads * hd).float()[:, None].repeat(1, 2)
    k = 100 + torch.arange(groups * hd).float()[:, None].repeat(1, 2)
    v = 200 + torch.arange(groups * hd).float()[:, None].repeat(1, 2)
    fused = fuse_qkv(q, k, v, heads, groups, hd)
    # group 0: q heads 0, 1, then k head 0, then v head 0
    assert fused[:, 0].tolist()[:12] == [0, 1, 2, 3, 4, 5, 100, 101, 102, 200, 201, 202]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, heads, groups, hd), (q, k, v)))
    # TP = 2 gives each rank one whole group
    assert shard(fused, COLUMN, 1, 2)[:, 0].tolist()[:3] == [6, 7, 8]


def test_gate_up_split_per_rank():
    gate, up = torch.arange(4.0), 10 + torch.arange(4.0)
    fused = torch.cat([gate, up])
    assert shard(fused, GLU, 0, 2).tolist() == [0, 1, 10, 11]
    assert shard(fused, GLU, 1, 2).tolist() == [2, 3, 12, 13]
    parts = [shard(fused, GLU, r, 2) for r in range(2)]
    assert torch.equal(unshard(parts, GLU), fused)
    w = torch.randn(3, 4)
    assert torch.equal(unshard([shard(w, ROW, r, 2) for r in range(2)], ROW), w)
    with pytest.raises(ValueError, match="does not split"):
        shard(torch.zeros(3, 3), COLUMN, 0, 2)
