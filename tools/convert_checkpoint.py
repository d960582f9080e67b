"""Convert checkpoints between Hugging Face folders and megatron dist checkpoints.

    python tools/convert_checkpoint.py import HF_FOLDER OUT_DIR
    python tools/convert_checkpoint.py export CHECKPOINT OUT_FOLDER --layout arkasr|glmasr|qwen3_asr \
        --tokenizer TOKENIZER_FOLDER [--blocked-from 151670]

import: a local HF folder (config.json, safetensors, tokenizer files) of Ark-ASR (`arkasr`),
transformers' `glmasr`, or Qwen3-ASR (native `qwen3_asr` names or the original `thinker.*`
names) -> OUT_DIR/step_000000, a megatron dist checkpoint that loads at any TP / PP layout,
with OUT_DIR/tokenizer/. Tensors are read lazily and copied into the model one at a time; an
unreadable file or a tensor with NaN / inf is an error naming the file and the tensor.

export: a checkpoint saved at any TP / PP layout (or a folder of them: the newest) -> a folder
that loads with transformers without this package: safetensors shards, config.json, the
tokenizer files and a generation_config.json (stop token, blocked ids). For the Ark-ASR
student, `glmasr` is transformers' native class and `arkasr` the model's own layout (it needs
its modeling code to load); a Qwen3-ASR model is written in transformers' `qwen3_asr` layout.
Both run in one process. Neither writes over an earlier import / export in OUT unless given
`--overwrite`, which removes exactly the files such a conversion writes (no stale shard stays
beside new ones); an export reads back the names and shapes of what it wrote.
"""

from __future__ import annotations

import argparse
import json
import glob
import os
import shutil
import sys
import warnings

import torch
from tqdm import tqdm


def _clear(folder: str, owned: list[str], overwrite: bool, what: str) -> None:
    """Refuse a folder that already holds `what` (the paths in `owned`) unless `overwrite`,
    which removes exactly those; nothing else in the folder is touched."""
    present = sorted({p for p in owned if os.path.exists(p)})
    if not present:
        return
    if not overwrite:
        raise FileExistsError(f"{folder} already holds {what} ({os.path.basename(present[0])}, ...): "
                              f"pass --overwrite to replace it, or choose another folder")
    for p in present:
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def do_import(args) -> str:
    from ark_mega import checkpoint
    from ark_mega.convert.hf_folder import copy_tokenizer, load_hf_model

    owned = checkpoint.list_checkpoints(args.dst) + [os.path.join(args.dst, "tokenizer")]
    _clear(args.dst, owned, args.overwrite, "a checkpoint")
    model, layout = load_hf_model(args.src, progress=True)
    path = checkpoint.save(args.dst, 0, model)
    if os.path.isfile(os.path.join(args.src, "tokenizer.json")):
        os.makedirs(os.path.join(args.dst, "tokenizer"), exist_ok=True)
        copy_tokenizer(args.src, os.path.join(args.dst, "tokenizer"))
    print(f"{args.src} ({layout}) -> {path}")
    return path


def _noting(tensors, shapes: dict):
    for name, tensor in tensors:
        shapes[name] = tuple(tensor.shape)
        yield name, tensor


def _verify(folder: str, expected: dict) -> None:
    """Read back the names and shapes of what was written."""
    from safetensors import safe_open

    from ark_mega.convert.hf_folder import written_files

    found = {}
    for path in written_files(folder):
        if path.endswith(".safetensors"):
            with safe_open(path, "pt") as f:
                found.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
        raise RuntimeError(f"{folder}: the written files do not hold what was exported "
                           f"(first differences: {wrong[:3]})")


def do_export(args) -> str:
    from ark_mega import checkpoint
    from ark_mega.convert.hf_folder import (TOKENIZER_FILES, config_to_hf, copy_tokenizer,
                                            disk_name, write_tensors, written_files)
    from ark_mega.convert.hf_maps import iter_global_to_hf
    from ark_mega.data import PromptBuilder, load_tokenizer
    from ark_mega.models import AudioLM
    from ark_mega.models.families import family, layout
    from ark_mega.transcribe import blocked_ids

    cfg = checkpoint.model_config(args.src)
    allowed = family(cfg.family).export_layouts
    args.layout = args.layout or allowed[0]
    if args.layout not in allowed:
        raise ValueError(f"{args.src} holds a {cfg.family} model: export it with --layout "
                         f"{' or '.join(allowed)}, not {args.layout}")
    model = AudioLM(cfg)
    checkpoint.load(args.src, model)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hf_config = config_to_hf(cfg, args.layout)  # fails before anything is written
    rules = layout(args.layout).rules(cfg)
    names = ["config.json", "generation_config.json", *TOKENIZER_FILES]
    owned = [os.path.join(args.dst, n) for n in names] + (
        written_files(args.dst) + glob.glob(os.path.join(args.dst, "model-*.safetensors"))
        if os.path.isdir(args.dst) else [])
    _clear(args.dst, owned, args.overwrite, "an export")
    os.makedirs(args.dst, exist_ok=True)
    tied_head = "lm_head.weight" if cfg.decoder.tie_embeddings else None  # stored once, as the embedding
    tensors = ((disk_name(args.layout, n), t) for n, t in iter_global_to_hf(state, rules, cfg)
               if n != tied_head)
    expected = {}
    with tqdm(desc=f"exporting {args.layout}", unit=" tensors") as bar:
        write_tensors(args.dst, _noting(tensors, expected), args.max_shard_gb * 2**30, bar)
    _verify(args.dst, expected)
    hf_config["torch_dtype"] = "float32" if state["gpt.embedding.word_embeddings.weight"].dtype == torch.float32 else "bfloat16"
    with open(os.path.join(args.dst, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=1)
    copy_tokenizer(args.tokenizer, args.dst)
    prompts = PromptBuilder.for_model(load_tokenizer(args.tokenizer), cfg)
    blocked = blocked_ids(prompts, cfg.decoder.vocab_size, args.blocked_from)
    with open(os.path.join(args.dst, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": prompts.stop_id, "pad_token_id": prompts.stop_id,
                   "do_sample": False, "max_new_tokens": 256,
                   "suppress_tokens": blocked.nonzero().squeeze(-1).tolist()}, f)
    print(f"{checkpoint.resolve(args.src)} -> {args.dst} ({args.layout})")
    return args.dst


def main() -> int:
    warnings.filterwarnings("ignore", category=UserWarning)
    from ark_mega.models.families import FAMILIES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF folder -> megatron dist checkpoint")
    imp.add_argument("src")
    imp.add_argument("dst")
    exp = sub.add_parser("export", help="megatron checkpoint -> HF folder")
    exp.add_argument("src")
    exp.add_argument("dst")
    exp.add_argument("--layout", choices=[name for fam in FAMILIES.values()
                                          for name in fam.export_layouts],
                     help="default: the first of the model family's (arkasr for Ark-ASR, "
                          "qwen3_asr for Qwen3-ASR models)")
    exp.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (+ files)")
    exp.add_argument("--blocked-from", type=int, default=None)
    exp.add_argument("--max-shard-gb", type=float, default=2.0)
    for sub_parser in (imp, exp):
        sub_parser.add_argument("--overwrite", action="store_true",
                                help="replace what an earlier import / export wrote to DST")
    args = ap.parse_args()

    from ark_mega.distributed import ParallelConfig, init_parallel

    init_parallel(ParallelConfig())
    (do_import if args.command == "import" else do_export)(args)
    return 0


if __name__ == "__main__":  # required: dist_checkpointing's save starts a spawned process
    from ark_mega.cli import run

    sys.exit(run(main))
