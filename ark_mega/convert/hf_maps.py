"""Hugging Face <-> megatron weight maps for the student (`glmasr`) and teacher (`qwen3_asr`).

A map is a list of `Rule`s: one of our tensors, how it shards over tensor-parallel ranks, and
the HF tensor(s) it is made of. Our side is first built unsharded with global layer numbers
("global" state dict), then cut into (tp_rank, pp_rank) shards, and the reverse. Names on our
side are those of `ark_mega.models.AudioLM` with the local layer spec. A layout's rules are
found by its name in `ark_mega.models.families`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.config import AudioLMConfig
from .sharding import COLUMN, GLU, REPLICATED, ROW, fuse_qkv, shard, split_qkv, stage_of_layer, unshard

DECODER_LAYERS = "gpt.decoder.layers."
EMBEDDING = "gpt.embedding.word_embeddings.weight"
OUTPUT = "gpt.output_layer.weight"


@dataclass(frozen=True)
class Rule:
    ours: str  # "{i}" stands for the layer number
    kind: str  # sharding kind (sharding.py)
    hf: tuple  # one HF name; (q, k, v) for fuse="qkv" (k may be None: no tensor); (gate, up) for "glu"
    fuse: str | None = None
    stack: str | None = None  # "encoder" / "decoder": the rule repeats per layer of that stack


def _encoder_layer_rules(hf: str, names: dict, key_bias: bool) -> list[Rule]:
    """Pre-LN encoder layer; `names` gives the HF module names of each part."""
    a = f"{hf}.layers.{{i}}.{names['attn']}"
    o = "encoder.block.layers.{i}."
    return [
        Rule(o + "input_layernorm.weight", REPLICATED, (f"{hf}.layers.{{i}}.{names['ln1']}.weight",)),
        Rule(o + "input_layernorm.bias", REPLICATED, (f"{hf}.layers.{{i}}.{names['ln1']}.bias",)),
        Rule(o + "self_attention.linear_qkv.weight", COLUMN,
             (f"{a}.q_proj.weight", f"{a}.k_proj.weight", f"{a}.v_proj.weight"), "qkv"),
        Rule(o + "self_attention.linear_qkv.bias", COLUMN,
             (f"{a}.q_proj.bias", f"{a}.k_proj.bias" if key_bias else None, f"{a}.v_proj.bias"), "qkv"),
        Rule(o + "self_attention.linear_proj.weight", ROW, (f"{a}.{names['out']}.weight",)),
        Rule(o + "self_attention.linear_proj.bias", REPLICATED, (f"{a}.{names['out']}.bias",)),
        Rule(o + "pre_mlp_layernorm.weight", REPLICATED, (f"{hf}.layers.{{i}}.{names['ln2']}.weight",)),
        Rule(o + "pre_mlp_layernorm.bias", REPLICATED, (f"{hf}.layers.{{i}}.{names['ln2']}.bias",)),
        Rule(o + "mlp.linear_fc1.weight", COLUMN, (f"{hf}.layers.{{i}}.{names['mlp']}fc1.weight",)),
        Rule(o + "mlp.linear_fc1.bias", COLUMN, (f"{hf}.layers.{{i}}.{names['mlp']}fc1.bias",)),
        Rule(o + "mlp.linear_fc2.weight", ROW, (f"{hf}.layers.{{i}}.{names['mlp']}fc2.weight",)),
        Rule(o + "mlp.linear_fc2.bias", REPLICATED, (f"{hf}.layers.{{i}}.{names['mlp']}fc2.bias",)),
    ]


def _projector_rules(ours: str, first: str, second: str) -> list[Rule]:
    return [
        Rule(f"{ours}.fc1.weight", COLUMN, (f"{first}.weight",)),
        Rule(f"{ours}.fc1.bias", COLUMN, (f"{first}.bias",)),
        Rule(f"{ours}.fc2.weight", ROW, (f"{second}.weight",)),
        Rule(f"{ours}.fc2.bias", REPLICATED, (f"{second}.bias",)),
    ]


def _decoder_rules(cfg: AudioLMConfig, hf: str, lm_head: str = "lm_head.weight") -> list[Rule]:
    dec = cfg.decoder
    a, o = f"{hf}.layers.{{i}}.self_attn", DECODER_LAYERS + "{i}."
    rules = [
        Rule(EMBEDDING, COLUMN, (f"{hf}.embed_tokens.weight",)),
        Rule("gpt.decoder.final_layernorm.weight", REPLICATED, (f"{hf}.norm.weight",)),
        Rule(o + "input_layernorm.weight", REPLICATED, (f"{hf}.layers.{{i}}.input_layernorm.weight",)),
        Rule(o + "self_attention.linear_qkv.weight", COLUMN,
             (f"{a}.q_proj.weight", f"{a}.k_proj.weight", f"{a}.v_proj.weight"), "qkv"),
        Rule(o + "self_attention.linear_proj.weight", ROW, (f"{a}.o_proj.weight",)),
        Rule(o + "pre_mlp_layernorm.weight", REPLICATED,
             (f"{hf}.layers.{{i}}.post_attention_layernorm.weight",)),
        Rule(o + "mlp.linear_fc1.weight", GLU,
             (f"{hf}.layers.{{i}}.mlp.gate_proj.weight", f"{hf}.layers.{{i}}.mlp.up_proj.weight"), "glu"),
        Rule(o + "mlp.linear_fc2.weight", ROW, (f"{hf}.layers.{{i}}.mlp.down_proj.weight",)),
    ]
    if dec.qkv_bias:
        rules.append(Rule(o + "self_attention.linear_qkv.bias", COLUMN,
                          (f"{a}.q_proj.bias", f"{a}.k_proj.bias", f"{a}.v_proj.bias"), "qkv"))
    if dec.qk_norm:
        rules += [Rule(o + "self_attention.q_layernorm.weight", REPLICATED, (f"{a}.q_norm.weight",)),
                  Rule(o + "self_attention.k_layernorm.weight", REPLICATED, (f"{a}.k_norm.weight",))]
    if not dec.tie_embeddings:
        rules.append(Rule(OUTPUT, COLUMN, (lm_head,)))
    return [Rule(r.ours, r.kind, r.hf, r.fuse, "decoder" if "{i}" in r.ours else None) for r in rules]


def _whisper_rules(t: str, names: dict, final_norm: str) -> list[Rule]:
    rules = [Rule(f"encoder.{c}.{p}", REPLICATED, (f"{t}.{c}.{p}",))
             for c in ("conv1", "conv2") for p in ("weight", "bias")]
    rules += [Rule(r.ours, r.kind, r.hf, r.fuse, "encoder")
              for r in _encoder_layer_rules(t, names, key_bias=False)]
    return rules + [Rule(f"encoder.block.final_layernorm.{p}", REPLICATED, (f"{final_norm}.{p}",))
                    for p in ("weight", "bias")]


def glmasr_rules(cfg: AudioLMConfig) -> list[Rule]:
    """Ark-ASR in transformers' native `glmasr` layout (with a Qwen2 text model)."""
    t = "model.audio_tower"
    names = dict(attn="self_attn", out="o_proj", ln1="input_layernorm",
                 ln2="post_attention_layernorm", mlp="mlp.")
    rules = _whisper_rules(t, names, f"{t}.norm")
    rules += _projector_rules("encoder.adapter", "model.multi_modal_projector.linear_1",
                              "model.multi_modal_projector.linear_2")
    return rules + _decoder_rules(cfg, "model.language_model")


def arkasr_rules(cfg: AudioLMConfig) -> list[Rule]:
    """Ark-ASR's own layout (`model_type: arkasr`): `audio_encoder.whisper.*` (Whisper names),
    `audio_encoder.layer_norm`, `audio_encoder.adapting.{0,2}`, then a Qwen2 `model.*`."""
    t = "audio_encoder.whisper"
    names = dict(attn="self_attn", out="out_proj", ln1="self_attn_layer_norm",
                 ln2="final_layer_norm", mlp="")
    rules = _whisper_rules(t, names, "audio_encoder.layer_norm")
    rules += _projector_rules("encoder.adapter", "audio_encoder.adapting.0", "audio_encoder.adapting.2")
    return rules + _decoder_rules(cfg, "model")


def _aut_rules(t: str, first: str, second: str) -> list[Rule]:
    names = dict(attn="self_attn", out="out_proj", ln1="self_attn_layer_norm",
                 ln2="final_layer_norm", mlp="")
    rules = [Rule(f"encoder.{c}.{p}", REPLICATED, (f"{t}.{c}.{p}",))
             for c in ("conv2d1", "conv2d2", "conv2d3") for p in ("weight", "bias")]
    rules.append(Rule("encoder.conv_out.weight", REPLICATED, (f"{t}.conv_out.weight",)))
    rules += [Rule(r.ours, r.kind, r.hf, r.fuse, "encoder")
              for r in _encoder_layer_rules(t, names, key_bias=True)]
    rules += [Rule(f"encoder.block.final_layernorm.{p}", REPLICATED, (f"{t}.ln_post.{p}",))
              for p in ("weight", "bias")]
    return rules + _projector_rules("encoder.projector", first, second)


def qwen3_asr_rules(cfg: AudioLMConfig) -> list[Rule]:
    """Qwen3-ASR in transformers' native `qwen3_asr` layout."""
    return (_aut_rules("model.audio_tower", "model.multi_modal_projector.linear_1",
                       "model.multi_modal_projector.linear_2")
            + _decoder_rules(cfg, "model.language_model"))


def qwen3_asr_thinker_rules(cfg: AudioLMConfig) -> list[Rule]:
    """Qwen3-ASR with the original `thinker.*` names (the qwen-asr package): the projector is
    the audio tower's proj1 / proj2."""
    t = "thinker.audio_tower"
    return (_aut_rules(t, f"{t}.proj1", f"{t}.proj2")
            + _decoder_rules(cfg, "thinker.model", lm_head="thinker.lm_head.weight"))


# ----------------------------------------------------------------------------- expansion


def _expanded(rules: list[Rule], cfg: AudioLMConfig):
    """(our name, kind, HF names, fuse, attention shape) for every concrete tensor."""
    layers = {"encoder": cfg.encoder.num_layers, "decoder": cfg.decoder.num_layers, None: 1}
    enc, dec = cfg.encoder, cfg.decoder
    shapes = {"encoder": (enc.num_heads, enc.num_heads, enc.hidden_size // enc.num_heads),
              "decoder": (dec.num_heads, dec.num_kv_heads, dec.kv_channels)}
    for r in rules:
        for i in range(layers[r.stack]):
            hf = tuple(h.format(i=i) if h else None for h in r.hf)
            yield r.ours.format(i=i), r.kind, hf, r.fuse, shapes.get(r.stack)


def iter_hf_to_global(hf, rules: list[Rule], cfg: AudioLMConfig, source: str = "checkpoint"):
    """(our name, unsharded tensor) for every rule, reading HF tensors as it goes; at the end,
    every HF tensor must have been used exactly once (a tied output layer may repeat the
    embedding)."""
    used = set()
    embedding = None
    for ours, _, names, fuse, shape in _expanded(rules, cfg):
        missing = [n for n in names if n is not None and n not in hf]
        if missing:
            raise KeyError(f"{source}: tensor {missing[0]!r} is missing (needed for {ours})")
        used.update(n for n in names if n is not None)
        if fuse == "qkv":
            q, k, v = (hf[n] if n else None for n in names)
            k = torch.zeros_like(v) if k is None else k
            tensor = fuse_qkv(q, k, v, *shape)
        elif fuse == "glu":
            tensor = torch.cat([hf[names[0]], hf[names[1]]])
        else:
            tensor = hf[names[0]]
        if ours == EMBEDDING:
            embedding = tensor
        yield ours, tensor
    head = _lm_head_name(rules)
    if cfg.decoder.tie_embeddings and head in hf:
        if not torch.equal(hf[head], embedding):
            raise ValueError(f"{source}: {head} differs from the embedding, but the config ties "
                             f"them (tie_embeddings=True)")
        used.add(head)
    unexpected = sorted(set(hf) - used)
    if unexpected:
        raise KeyError(f"{source}: {len(unexpected)} unexpected tensor(s), first {unexpected[0]!r}")


def hf_to_global(hf, rules: list[Rule], cfg: AudioLMConfig,
                 source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """HF state dict -> our unsharded state dict."""
    return dict(iter_hf_to_global(hf, rules, cfg, source))


def iter_global_to_hf(ours, rules: list[Rule], cfg: AudioLMConfig):
    """(HF name, tensor) for every tensor of the HF layout, from our unsharded tensors."""
    for name, _, names, fuse, shape in _expanded(rules, cfg):
        t = ours[name]
        if fuse == "qkv":
            for n, part in zip(names, split_qkv(t, *shape)):
                if n is not None:  # a missing HF tensor (no key bias) is dropped
                    yield n, part.clone()
        elif fuse == "glu":
            gate, up = t.chunk(2, dim=0)
            yield names[0], gate.clone()
            yield names[1], up.clone()
        else:
            yield names[0], t.clone()
    if cfg.decoder.tie_embeddings:
        yield _lm_head_name(rules), ours[EMBEDDING].clone()


def global_to_hf(ours: dict[str, torch.Tensor], rules: list[Rule],
                 cfg: AudioLMConfig) -> dict[str, torch.Tensor]:
    return dict(iter_global_to_hf(ours, rules, cfg))


def _lm_head_name(rules: list[Rule]) -> str:
    """The HF name of the output layer: the embedding's prefix decides (thinker.* or not)."""
    embedding = next(r.hf[0] for r in rules if r.ours == EMBEDDING)
    return "thinker.lm_head.weight" if embedding.startswith("thinker.") else "lm_head.weight"


# ----------------------------------------------------------------------------- TP / PP shards


def _placement(name: str, cfg: AudioLMConfig, pp: int) -> list[tuple[int, str]]:
    """(stage, local name) pairs holding global tensor `name`."""
    last = pp - 1
    if name.startswith(DECODER_LAYERS):
        index, rest = name[len(DECODER_LAYERS):].split(".", 1)
        stage, local = stage_of_layer(int(index), cfg.decoder.num_layers, pp)
        return [(stage, f"{DECODER_LAYERS}{local}.{rest}")]
    if name == EMBEDDING and cfg.decoder.tie_embeddings and pp > 1:
        return [(0, name), (last, OUTPUT)]  # the last stage keeps a copy of the tied weight
    if name.startswith("gpt.decoder.final_layernorm") or name == OUTPUT:
        return [(last, name)]
    return [(0, name)]


def global_to_shards(ours: dict[str, torch.Tensor], rules: list[Rule], cfg: AudioLMConfig,
                     tp: int, pp: int) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    kinds = {name: kind for name, kind, *_ in _expanded(rules, cfg)}
    shards = {(t, p): {} for t in range(tp) for p in range(pp)}
    for name, tensor in ours.items():
        for stage, local in _placement(name, cfg, pp):
            for t in range(tp):
                shards[(t, stage)][local] = shard(tensor, kinds[name], t, tp)
    return shards


def shards_to_global(shards: dict[tuple[int, int], dict[str, torch.Tensor]], rules: list[Rule],
                     cfg: AudioLMConfig, tp: int, pp: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, kind, *_ in _expanded(rules, cfg):
        stage, local = _placement(name, cfg, pp)[0]
        parts = []
        for t in range(tp):
            if local not in shards[(t, stage)]:
                raise KeyError(f"tensor {local!r} is missing from the shard of tensor-parallel "
                               f"rank {t}, pipeline stage {stage}")
            parts.append(shards[(t, stage)][local])
        out[name] = unshard(parts, kind)
    return out


def hf_to_megatron(hf: dict[str, torch.Tensor], layout: str, cfg: AudioLMConfig, tp: int = 1,
                   pp: int = 1, source: str = "checkpoint"):
    """HF state dict -> {(tp_rank, pp_rank): megatron state dict of that rank}."""
    rules = _rules(layout, cfg)
    return global_to_shards(hf_to_global(hf, rules, cfg, source), rules, cfg, tp, pp)


def megatron_to_hf(shards, layout: str, cfg: AudioLMConfig, tp: int = 1, pp: int = 1):
    """{(tp_rank, pp_rank): megatron state dict} -> HF state dict."""
    rules = _rules(layout, cfg)
    return global_to_hf(shards_to_global(shards, rules, cfg, tp, pp), rules, cfg)


def _rules(layout: str, cfg: AudioLMConfig) -> list[Rule]:
    from ..models.families import layout as find_layout  # families imports this module

    return find_layout(layout).rules(cfg)


def load_shard(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load one rank's shard into `model`, failing on any missing, unexpected or misshapen tensor."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"shard does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{k}: shard has shape {tuple(v.shape)}, model {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)
