"""Build a real-shape preset with random weights and run one forward + backward.

    python tools/smoke_real_shapes.py --preset ark_asr_0p6b [--seconds 10 --batch 2]
    torchrun --nproc_per_node 8 tools/smoke_real_shapes.py --preset qwen3_asr_1p7b --tp 2

bf16 with Transformer Engine layers on a GPU when TE is installed, float32 local layers on CPU.
Prints the layer backend, parameter count, loss, step time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def main() -> int:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from ark_mega.distributed import ParallelConfig, device, init_parallel
    from ark_mega.models import AudioLM, preset
    from ark_mega.models.families import family
    from ark_mega.pipeline import run_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ark_asr_0p6b")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--out", help="write the results as JSON here (first rank of the last stage)")
    args = ap.parse_args()

    init_parallel(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp))
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = preset(args.preset)
    t0 = time.perf_counter()
    model = AudioLM(cfg, dtype=dtype).to(dev)
    built = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())

    frames = int(args.seconds * 100)
    count = family(cfg.family).audio_tokens(cfg.encoder, frames)
    gen = torch.Generator().manual_seed(0)
    ids, feats = [], []
    for _ in range(args.batch):
        text = torch.randint(0, min(150000, cfg.decoder.vocab_size), (args.text_tokens,),
                             generator=gen)
        text[text == cfg.audio_token_id] = 0  # only the audio placeholders carry that id
        ids.append(torch.cat([torch.full((count,), cfg.audio_token_id), text]))
        feats.append(torch.randn(cfg.encoder.num_mel_bins, frames, generator=gen).to(dev, dtype))
    lengths = [len(x) for x in ids]
    batch = {"input_ids": torch.cat(ids)[None].to(dev),
             "cu_seqlens": torch.tensor([0] + lengths).cumsum(0).to(dev),
             "audio_features": feats}

    def loss_fn(logits, b):
        labels = torch.roll(b["input_ids"][0], -1)
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits[:, 0].float(), labels).mean()
        return loss, {"loss": loss.detach()}

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    reports = run_pipeline(model, [batch], loss_fn, forward_only=False)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    step = time.perf_counter() - t0
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        result = {"preset": args.preset, "device": str(dev), "dtype": str(dtype),
                  "layers": model.transformer_impl, "tp": args.tp, "pp": args.pp,
                  "params_this_rank": n_params, "build_s": built, "tokens": sum(lengths),
                  "loss": reports[0]["loss"].item(), "grads_finite": grads_finite,
                  "fwd_bwd_s": step, "peak_gib": peak}
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in result.items()))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    return 0 if grads_finite else 1


if __name__ == "__main__":
    sys.exit(main())
