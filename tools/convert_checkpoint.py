"""Convert checkpoints between Hugging Face folders and megatron dist checkpoints.

    python tools/convert_checkpoint.py import HF_FOLDER OUT_DIR
    python tools/convert_checkpoint.py export CHECKPOINT OUT_FOLDER --layout arkasr|glmasr|qwen3_asr \
        --tokenizer TOKENIZER_FOLDER [--blocked-from 151670]

import: a local HF folder (config.json, safetensors, tokenizer files) of Ark-ASR (`arkasr`),
transformers' `glmasr`, or Qwen3-ASR (native `qwen3_asr` names or the original `thinker.*`
names) -> OUT_DIR/step_000000, a megatron dist checkpoint that loads at any TP / PP layout,
with OUT_DIR/tokenizer/. Tensors are read lazily and copied into the model one at a time.

export: a checkpoint saved at any TP / PP layout (or a folder of them: the newest) -> a folder
that loads with transformers without this package: safetensors shards, config.json, the
tokenizer files and a generation_config.json (stop token, blocked ids). For the Ark-ASR
student, `glmasr` is transformers' native class and `arkasr` the model's own layout (it needs
its modeling code to load); a Qwen3-ASR model is written in transformers' `qwen3_asr` layout.
Both run in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch
from tqdm import tqdm


def do_import(args) -> str:
    from ark_mega import checkpoint
    from ark_mega.convert.hf_folder import copy_tokenizer, load_hf_model

    model, layout = load_hf_model(args.src, progress=True)
    path = checkpoint.save(args.dst, 0, model)
    if os.path.isfile(os.path.join(args.src, "tokenizer.json")):
        os.makedirs(os.path.join(args.dst, "tokenizer"), exist_ok=True)
        copy_tokenizer(args.src, os.path.join(args.dst, "tokenizer"))
    print(f"{args.src} ({layout}) -> {path}")
    return path


LAYOUTS = {"ark_asr": ("arkasr", "glmasr"), "qwen3_asr": ("qwen3_asr",)}  # by model family


def do_export(args) -> str:
    from ark_mega import checkpoint
    from ark_mega.convert.hf_folder import config_to_hf, copy_tokenizer, disk_name, write_tensors
    from ark_mega.convert.hf_maps import iter_global_to_hf, rules_for
    from ark_mega.data import PromptBuilder, load_tokenizer
    from ark_mega.models import AudioLM
    from ark_mega.opd.transcribe import blocked_ids

    cfg = checkpoint.model_config(args.src)
    allowed = LAYOUTS[cfg.family]
    args.layout = args.layout or allowed[0]
    if args.layout not in allowed:
        raise ValueError(f"{args.src} holds a {cfg.family} model: export it with --layout "
                         f"{' or '.join(allowed)}, not {args.layout}")
    model = AudioLM(cfg)
    checkpoint.load(args.src, model)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hf_config = config_to_hf(cfg, args.layout)  # fails before anything is written
    rules = rules_for(args.layout, cfg)
    os.makedirs(args.dst, exist_ok=True)
    tied_head = "lm_head.weight" if cfg.decoder.tie_embeddings else None  # stored once, as the embedding
    tensors = ((disk_name(args.layout, n), t) for n, t in iter_global_to_hf(state, rules, cfg)
               if n != tied_head)
    with tqdm(desc=f"exporting {args.layout}", unit=" tensors") as bar:
        write_tensors(args.dst, tensors, args.max_shard_gb * 2**30, bar)
    hf_config["torch_dtype"] = "float32" if state["gpt.embedding.word_embeddings.weight"].dtype == torch.float32 else "bfloat16"
    with open(os.path.join(args.dst, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=1)
    copy_tokenizer(args.tokenizer, args.dst)
    tokenizer = load_tokenizer(args.tokenizer)
    prompts = (PromptBuilder.student(tokenizer, cfg.encoder.merge_factor) if cfg.family == "ark_asr"
               else PromptBuilder.teacher(tokenizer, cfg.encoder.n_window))
    blocked = blocked_ids(prompts, cfg.decoder.vocab_size, args.blocked_from)
    with open(os.path.join(args.dst, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": prompts.stop_id, "pad_token_id": prompts.stop_id,
                   "do_sample": False, "max_new_tokens": 256,
                   "suppress_tokens": blocked.nonzero().squeeze(-1).tolist()}, f)
    print(f"{checkpoint.resolve(args.src)} -> {args.dst} ({args.layout})")
    return args.dst


def main() -> int:
    warnings.filterwarnings("ignore", category=UserWarning)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF folder -> megatron dist checkpoint")
    imp.add_argument("src")
    imp.add_argument("dst")
    exp = sub.add_parser("export", help="megatron checkpoint -> HF folder")
    exp.add_argument("src")
    exp.add_argument("dst")
    exp.add_argument("--layout", choices=["arkasr", "glmasr", "qwen3_asr"],
                     help="default: arkasr for Ark-ASR, qwen3_asr for Qwen3-ASR models")
    exp.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (+ files)")
    exp.add_argument("--blocked-from", type=int, default=None)
    exp.add_argument("--max-shard-gb", type=float, default=2.0)
    args = ap.parse_args()

    from ark_mega.distributed import ParallelConfig, init_parallel

    init_parallel(ParallelConfig())
    (do_import if args.command == "import" else do_export)(args)
    return 0


if __name__ == "__main__":  # required: dist_checkpointing's save starts a spawned process
    sys.exit(main())
