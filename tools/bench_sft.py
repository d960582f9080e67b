"""Benchmark: SFT throughput of the student on packed batches, tokens/s and MFU, in one run.

    python tools/bench_sft.py              # 1 GPU: ark_asr_0p6b, random weights, bf16,
                                           # 32 utterances of 30 s with 48-token transcripts
                                           # (15,968 decoder tokens: examples/configs'
                                           # real-scale budget is 32,768 per rank)
    python tools/bench_sft.py --smoke      # tiny model on the CPU: checks the script runs

One step is the trainer's: megatron DDP, the packed forward + backward of `sft_step`, megatron's
optimizer (distributed with CUDA). MFU = model FLOPs of the step (`train_flops`, written out
below) / step time / the bf16 throughput of a large matrix product measured in the same run.
"""

from __future__ import annotations

import datetime
import sys
import warnings

import torch

from device_speed import bench_device, bench_parser, matmul_tflops, report, sync, timed, write_profile
from random_models import random_model, toy_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog " * 8


def train_flops(cfg, utterances: list[tuple[int, int, int]]) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward; no recomputation)
    of an Ark-ASR model on utterances given as (mel frames, decoder tokens, scored tokens).
    Matrix products only (2 FLOPs per multiply-add), attention scores and values included,
    causal attention counted at half; the output layer at the scored tokens (`sft_step` runs
    it nowhere else)."""
    from ark_mega.models.config import WhisperEncoderConfig

    enc, dec = cfg.encoder, cfg.decoder
    if not isinstance(enc, WhisperEncoderConfig):
        raise ValueError(f"train_flops covers the Whisper encoder (Ark-ASR), not {cfg.family}'s")
    he, hd, h = enc.hidden_size, dec.kv_channels, dec.hidden_size
    # decoder, per token: QKV, output projection, SwiGLU MLP (3 matrices)
    per_token = dec.num_layers * 2 * (h * (dec.num_heads + 2 * dec.num_kv_heads) * hd
                                      + dec.num_heads * hd * h + 3 * h * dec.ffn_hidden_size)
    forward = 0.0
    for frames, tokens, scored in utterances:
        positions = (frames + 1) // 2  # after the stride-2 convolution
        audio_tokens = positions // enc.merge_factor
        forward += tokens * per_token + scored * 2 * h * dec.vocab_size
        forward += dec.num_layers * 2 * 2 * dec.num_heads * hd * tokens * (tokens + 1) / 2
        # encoder: conv1 (k=3) at every frame, conv2 (k=3, stride 2); layers: QKV + proj (4 he^2)
        # and the MLP (2 he ffn) per position, bidirectional attention over the utterance
        forward += 2 * 3 * enc.num_mel_bins * he * frames + 2 * 3 * he * he * positions
        forward += enc.num_layers * (2 * (4 * he * he + 2 * he * enc.ffn_hidden_size) * positions
                                     + 2 * 2 * he * positions * positions)
        # adapter: merge_factor frames -> Linear(merge * he, 2h) -> Linear(2h, h)
        forward += 2 * (enc.merge_factor * he * 2 * h + 2 * h * h) * audio_tokens
    return 3 * forward


def main() -> int:
    warnings.filterwarnings("ignore")
    ap = bench_parser(__doc__, utterance=True)
    ap.add_argument("--utterances", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=48)
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.utterances, args.seconds, args.text_tokens = "tiny_ark_asr", 3, 2.0, 8
    if (where := bench_device(args.smoke)) is None:
        return 2
    dev, dtype = where

    from ark_mega.config import OptimConfig
    from ark_mega.data import Collator
    from ark_mega.distributed import ParallelConfig, init_parallel
    from ark_mega.opd.steps import sft_step
    from ark_mega.opd.trainer import build_optimizer

    init_parallel(ParallelConfig())
    tok = toy_tokenizer()
    model, prompts = random_model(args.preset, tok, dtype, dev, tiny=args.smoke)
    ddp, optimizer, _ = build_optimizer(model, OptimConfig(lr=1e-5), dtype, steps=100)

    frames = int(args.seconds * 100)
    text = tok.decode(prompts.encode(TEXT)[: args.text_tokens])
    built = [prompts.build(frames, text, "en") for _ in range(args.utterances)]
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(model.cfg.encoder.num_mel_bins, frames, generator=gen)
             for _ in built]
    batch = Collator(prompts).batch(built, feats, [str(i) for i in range(len(built))],
                                    [text] * len(built))

    def step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        sft_step(ddp, [batch])
        optimizer.step()

    step()  # warm-up
    sync(dev)
    ms = timed(step, dev, reps=2)
    flops = train_flops(model.cfg, [(frames, len(p.input_ids), len(p.input_ids) - p.num_prompt)
                                    for p in built])
    peak = matmul_tflops(dev) if dev.type == "cuda" else float("nan")
    achieved = flops / ms / 1e9
    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)",
        "setup": {"preset": args.preset, "utterances": args.utterances, "seconds": args.seconds,
                  "decoder_tokens": batch.num_tokens, "dtype": str(dtype),
                  "layers": model.transformer_impl,
                  "optimizer": type(optimizer.chained_optimizers[0]).__name__},
        "step_ms": ms, "tokens_per_s": batch.num_tokens / ms * 1e3,
        "audio_seconds_per_s": args.utterances * args.seconds / ms * 1e3,
        "model_tflop_per_step": flops / 1e12, "achieved_tflops": achieved,
        "matmul_peak_tflops": peak, "mfu": achieved / peak,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
    }
    report(result, args.out)
    if args.profile:
        write_profile(args.profile, step, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
