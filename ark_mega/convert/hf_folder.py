"""Hugging Face folders: configs <-> our model config, lazy safetensors reading, sharded writing.

Reading is lazy (tensors are read from the safetensors files when a map rule asks for them)
and writing is streamed shard by shard, so neither direction holds the model twice.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.config import AudioLMConfig, AuTEncoderConfig, DecoderConfig, WhisperEncoderConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "preprocessor_config.json")


class UnsupportedConfig(ValueError):
    """A Hugging Face config that our models cannot express."""


# transformers saves `glmasr` under its legacy (llava-style) names and renames on load.
_ON_DISK = {"glmasr": [("model.audio_tower.", "audio_tower."),
                       ("model.multi_modal_projector.", "multi_modal_projector."),
                       ("model.language_model.", "language_model.model."),
                       ("lm_head.", "language_model.lm_head.")]}


def disk_name(layout: str, name: str) -> str:
    """The name a tensor has in the layout's files (from its in-memory name)."""
    for memory, disk in _ON_DISK.get(layout, ()):
        if name.startswith(memory):
            return disk + name[len(memory):]
    return name


def memory_name(layout: str, name: str) -> str:
    """Inverse of `disk_name`; in-memory names are accepted as they are."""
    for memory, disk in _ON_DISK.get(layout, ()):
        if name.startswith(disk):
            return memory + name[len(disk):]
    return name


class LazyTensors(Mapping):
    """{name: tensor} over the safetensors files of a folder, read on access; names are the
    layout's in-memory names."""

    def __init__(self, folder: str, layout: str = ""):
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.where = {k: os.path.join(folder, v) for k, v in weight_map.items()}
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{folder}: no .safetensors files")
            self.where = {}
            for name in files:
                with _opened(os.path.join(folder, name)) as f:
                    self.where.update({k: os.path.join(folder, name) for k in f.keys()})
        self.stored = {memory_name(layout, k): k for k in self.where}
        self.where = {memory_name(layout, k): v for k, v in self.where.items()}
        self._open = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self.where[name]
        if path not in self._open:
            self._open[path] = _opened(path)
        try:
            tensor = self._open[path].get_tensor(self.stored[name])
        except Exception as e:  # a truncated file fails here, naming neither file nor tensor
            raise ValueError(f"{path}: cannot read tensor {self.stored[name]!r}: {e}") from None
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {self.stored[name]!r} has non-finite values "
                             f"(NaN or inf): a corrupted file?")
        return tensor

    def __iter__(self):
        return iter(self.where)

    def __len__(self):
        return len(self.where)


def _opened(path: str):
    try:
        return safe_open(path, "pt")
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def written_files(folder: str) -> list[str]:
    """The weight files an export wrote to `folder`: model.safetensors, or the index and the
    shards it names."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return [index] + sorted({os.path.join(folder, v) for v in json.load(f)["weight_map"].values()})
    return [os.path.join(folder, "model.safetensors")]


def write_tensors(folder: str, tensors: Iterator[tuple[str, torch.Tensor]],
                  max_shard_bytes: int = 2 * 2**30, progress=None) -> None:
    """Write (name, tensor) pairs as safetensors shards + index, one shard in memory at a time."""
    os.makedirs(folder, exist_ok=True)
    shard, size, files, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        size += nbytes
        if progress is not None:
            progress.update(1)
    flush()
    if len(files) == 1:
        os.replace(os.path.join(folder, files[0]), os.path.join(folder, "model.safetensors"))
    else:
        total = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


def copy_tokenizer(src: str, dst: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    if "tokenizer.json" not in copied:
        raise FileNotFoundError(f"{src}: no tokenizer.json to copy")
    return copied


# ----------------------------------------------------------------------------- configs


def _rope_theta(text: dict) -> float:
    params = text.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        raise UnsupportedConfig(f"rope_type {params['rope_type']!r}: only default RoPE is supported")
    return float(params.get("rope_theta", text.get("rope_theta", 10000.0)))


def _decoder(text: dict, qk_norm: bool, qkv_bias: bool, tie: bool) -> DecoderConfig:
    if text.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfig(f"text model activation {text['hidden_act']!r}: SwiGLU (silu) only")
    heads = text["num_attention_heads"]
    return DecoderConfig(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
        num_layers=text["num_hidden_layers"], num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") if text.get("head_dim") not in (None, text["hidden_size"] // heads) else None,
        ffn_hidden_size=text["intermediate_size"], rotary_base=_rope_theta(text),
        rms_norm_eps=text.get("rms_norm_eps", 1e-6), qkv_bias=qkv_bias, qk_norm=qk_norm,
        tie_embeddings=tie, max_position_embeddings=text.get("max_position_embeddings", 32768))


def config_from_hf(hf: dict) -> tuple[AudioLMConfig, str]:
    """Our model config and the weight layout for a Hugging Face config.json."""
    kind = hf.get("model_type")
    if kind == "glmasr":
        text, audio = hf["text_config"], hf["audio_config"]
        if text.get("model_type") != "qwen2":
            raise UnsupportedConfig(f"glmasr with a {text.get('model_type')!r} text model: only "
                                    f"Qwen2 (QKV bias) text models are supported")
        rope = audio.get("rope_parameters") or {}
        enc = WhisperEncoderConfig(
            num_mel_bins=audio["num_mel_bins"], hidden_size=audio["hidden_size"],
            num_layers=audio["num_hidden_layers"], num_heads=audio["num_attention_heads"],
            ffn_hidden_size=audio["intermediate_size"],
            rotary_percent=rope.get("partial_rotary_factor", 0.5),
            rotary_base=rope.get("rope_theta", 10000.0),
            max_frames=audio.get("max_position_embeddings", 1500))
        if enc.ffn_hidden_size != 4 * enc.hidden_size:
            raise UnsupportedConfig("glmasr merges encoder frames to intermediate_size-wide rows; "
                                    "our adapter merges 4 frames: intermediate_size must be 4 * hidden_size")
        dec = _decoder(text, False, True, hf.get("tie_word_embeddings", True))
        return AudioLMConfig("ark_asr", enc, dec, hf["audio_token_id"]), "glmasr"
    if kind == "arkasr":
        w = hf["whisper_config"]
        if not hf.get("use_rope", True):
            raise UnsupportedConfig("arkasr with use_rope=false (learned positions) is not supported")
        if hf.get("mlp_adapter_act", "gelu") != "gelu" or hf.get("adapter_type", "mlp") != "mlp":
            raise UnsupportedConfig("arkasr adapter: only the gelu MLP adapter is supported")
        enc = WhisperEncoderConfig(
            num_mel_bins=w.get("num_mel_bins", 128), hidden_size=w["d_model"],
            num_layers=w["encoder_layers"], num_heads=w["encoder_attention_heads"],
            ffn_hidden_size=w["encoder_ffn_dim"], max_frames=hf.get("max_whisper_length", 1500),
            merge_factor=hf.get("merge_factor", 4))
        dec = _decoder(hf, False, True, hf.get("tie_word_embeddings", True))
        return AudioLMConfig("ark_asr", enc, dec, hf["audio_token_id"]), "arkasr"
    if kind in ("qwen3_asr", "qwen3_asr_thinker") or "thinker_config" in hf:
        layout = "qwen3_asr_thinker" if "thinker_config" in hf else "qwen3_asr"
        inner = hf.get("thinker_config", hf)
        text, audio = inner["text_config"], inner["audio_config"]
        enc = AuTEncoderConfig(
            num_mel_bins=audio.get("num_mel_bins", 128), hidden_size=audio["d_model"],
            num_layers=audio["encoder_layers"], num_heads=audio["encoder_attention_heads"],
            ffn_hidden_size=audio["encoder_ffn_dim"],
            downsample_hidden_size=audio.get("downsample_hidden_size", 480),
            output_dim=audio["output_dim"], n_window=audio.get("n_window", 50),
            n_window_infer=audio.get("n_window_infer", 800),
            max_source_positions=audio.get("max_position_embeddings",
                                           audio.get("max_source_positions", 13)))
        dec = _decoder(text, True, False, inner.get("tie_word_embeddings",
                                                    hf.get("tie_word_embeddings", True)))
        token = inner.get("audio_token_id", hf.get("audio_token_id", 151676))
        return AudioLMConfig("qwen3_asr", enc, dec, token), layout
    raise UnsupportedConfig(f"model_type {kind!r}: supported are glmasr, arkasr and qwen3_asr")


def config_to_hf(cfg: AudioLMConfig, layout: str) -> dict:
    """config.json for a model exported in `layout`."""
    from .hf_configs import glmasr_config, qwen3_asr_config

    if layout == "glmasr":
        return glmasr_config(cfg).to_dict()
    if layout == "qwen3_asr":
        return qwen3_asr_config(cfg).to_dict()
    if layout != "arkasr":
        raise ValueError(f"cannot export to layout {layout!r}")
    enc, dec = cfg.encoder, cfg.decoder
    if dec.head_dim not in (None, dec.hidden_size // dec.num_heads) or dec.qk_norm:
        raise UnsupportedConfig("arkasr's text model is Qwen2: no head_dim override, no QK-norm")
    return {
        "model_type": "arkasr", "architectures": ["ArkasrForConditionalGeneration"],
        "vocab_size": dec.vocab_size, "hidden_size": dec.hidden_size,
        "num_hidden_layers": dec.num_layers, "num_attention_heads": dec.num_heads,
        "num_key_value_heads": dec.num_kv_heads, "intermediate_size": dec.ffn_hidden_size,
        "hidden_act": "silu", "rms_norm_eps": dec.rms_norm_eps, "rope_theta": dec.rotary_base,
        "max_position_embeddings": dec.max_position_embeddings,
        "tie_word_embeddings": dec.tie_embeddings, "audio_token_id": cfg.audio_token_id,
        "merge_factor": enc.merge_factor, "use_rope": True, "max_whisper_length": enc.max_frames,
        "mlp_adapter_act": "gelu", "adapter_type": "mlp",
        "whisper_config": {"model_type": "whisper", "num_mel_bins": enc.num_mel_bins,
                           "d_model": enc.hidden_size, "encoder_layers": enc.num_layers,
                           "encoder_attention_heads": enc.num_heads,
                           "encoder_ffn_dim": enc.ffn_hidden_size,
                           "max_source_positions": enc.max_frames},
    }


def load_hf_model(folder: str, dtype: torch.dtype = torch.float32, progress: bool = False):
    """An AudioLM (TP = PP = 1) with the weights of a Hugging Face folder, read tensor by
    tensor; returns (model, layout)."""
    from ..models import AudioLM
    from .hf_maps import iter_hf_to_global, rules_for

    with open(os.path.join(folder, "config.json")) as f:
        cfg, layout = config_from_hf(json.load(f))
    tensors = LazyTensors(folder, layout)
    if layout == "qwen3_asr" and any(k.startswith("thinker.") for k in tensors):
        layout = "qwen3_asr_thinker"
    model = AudioLM(cfg, dtype=dtype)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    filled = set()
    items = iter_hf_to_global(tensors, rules_for(layout, cfg), cfg, source=folder)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc=f"reading {layout}", unit=" tensors")
    with torch.no_grad():
        for name, tensor in items:
            if name not in own:
                raise KeyError(f"{folder}: our model has no tensor {name}")
            if own[name].shape != tensor.shape:
                raise ValueError(f"{folder}: {name} has shape {tuple(tensor.shape)}, the config "
                                 f"says {tuple(own[name].shape)}")
            own[name].copy_(tensor)
            filled.add(name)
    missing = sorted(set(own) - filled)
    if missing:
        raise KeyError(f"{folder}: nothing in the checkpoint for {missing[:3]}")
    return model, layout
