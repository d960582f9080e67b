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

from ..models import families
from ..models.config import AudioLMConfig
from .hf_configs import UnsupportedConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "preprocessor_config.json")


def disk_name(layout: str, name: str) -> str:
    """The name a tensor has in the layout's files (from its in-memory name)."""
    for memory, disk in families.layout(layout).on_disk:
        if name.startswith(memory):
            return disk + name[len(memory):]
    return name


def memory_name(layout: str, name: str) -> str:
    """Inverse of `disk_name`; in-memory names are accepted as they are."""
    for memory, disk in families.layout(layout).on_disk:
        if name.startswith(disk):
            return memory + name[len(disk):]
    return name


class LazyTensors(Mapping):
    """{name: tensor} over the safetensors files of a folder, read on access; names are the
    layout's in-memory names."""

    def __init__(self, folder: str, layout: str):
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
        self.where = {name: self.where[k] for name, k in self.stored.items()}
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


def config_from_hf(hf: dict) -> tuple[AudioLMConfig, str]:
    """Our model config and the weight layout for a Hugging Face config.json."""
    for fam in families.FAMILIES.values():
        for lay in fam.layouts:
            if lay.reads(hf):
                return AudioLMConfig(fam.name, *lay.config_from_hf(hf)), lay.name
    known = sorted(t for fam in families.FAMILIES.values() for lay in fam.layouts
                   for t in lay.model_types)
    raise UnsupportedConfig(f"model_type {hf.get('model_type')!r}: supported are {', '.join(known)}")


def config_to_hf(cfg: AudioLMConfig, layout: str) -> dict:
    """config.json for a model exported in `layout`."""
    export = families.layout(layout).config_to_hf
    if export is None:
        raise ValueError(f"cannot export to layout {layout!r}")
    return export(cfg)


def load_hf_model(folder: str, dtype: torch.dtype = torch.float32, progress: bool = False):
    """An AudioLM (TP = PP = 1) with the weights of a Hugging Face folder, read tensor by
    tensor; returns (model, layout)."""
    from ..models import AudioLM
    from .hf_maps import iter_hf_to_global

    with open(os.path.join(folder, "config.json")) as f:
        cfg, layout = config_from_hf(json.load(f))
    tensors = LazyTensors(folder, layout)
    for sibling in families.family(cfg.family).layouts:  # names can say more than config.json
        if sibling.tensor_prefix and any(k.startswith(sibling.tensor_prefix) for k in tensors):
            layout = sibling.name
    model = AudioLM(cfg, dtype=dtype)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    filled = set()
    items = iter_hf_to_global(tensors, families.layout(layout).rules(cfg), cfg, source=folder)
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
