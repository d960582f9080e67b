"""Benchmark: student rollout decoding against the weight-streaming floor, in one run.

    python tools/bench_decode.py              # 1 GPU: ark_asr_0p6b, random weights, bf16,
                                              # 64 utterances of 30 s, 64 new tokens each
    python tools/bench_decode.py --smoke      # tiny model on the CPU: checks the script runs

Each decoding step reads every decoder weight once (the output layer included), so no step is
shorter than decoder weight bytes / memory bandwidth: with the bandwidth of a device-to-device
copy measured in the same run, the floor is batch / that time, in tokens per second. The stop
token is blocked so that every row decodes all its tokens. Reported: prefill time (encoder,
prompt, first token); decode tokens/s of the steady steps (after the first two; the median over
--repeats pairs of rollouts) and their fraction of the floor; tokens/s over all the steps after
the prefill (`rollout_decode_tokens_per_s`); on a GPU with the decoding step replayed as a CUDA
graph (the default) and, as the same run's baseline, without; last, the decoding step with each
alternative to its default kernels (`DecodeKernels`), timed as the default is
(`variants_ms_per_step`; a variant that fails is recorded with its error). The model keeps its
decoding step, graph included, for later rollouts of the same batch size and cache length: only
the first rollout of a shape warms the graph up eagerly and captures it
(`first_rollout_extra_s`: what it took more than a later one, with the kernels' first
compilation). Should the graph's capture fail, the run reports its error and the eager figures;
should the default kernels fail, it reports that error, still times the alternatives and exits
1. With --profile: where a whole rollout's time goes, then each kernel's calls and time per
steady step (a rollout's kernels less those of a 3-token one, per extra step).
"""

from __future__ import annotations

import datetime
import statistics
import sys
import time
import traceback
import warnings

import torch

from device_speed import (bench_device, bench_parser, copy_gbps, report, sync,
                          write_difference_profile, write_json, write_profile)
from random_models import random_model, toy_tokenizer


def decoder_weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not n.startswith("encoder."))


def main() -> int:
    warnings.filterwarnings("ignore")
    ap = bench_parser(__doc__, utterance=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7,
                    help="pairs of rollouts per steady-step figure (their median)")
    args = ap.parse_args()
    if args.new_tokens < 4:
        ap.error("--new-tokens must be at least 4: the first two decoding steps are timed apart")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.smoke:
        args.preset, args.batch, args.seconds, args.new_tokens = "tiny_ark_asr", 4, 2.0, 6
        args.repeats = 2
    if (where := bench_device(args.smoke)) is None:
        return 2
    dev, dtype = where

    from ark_mega.config import GenerationConfig
    from ark_mega.distributed import ParallelConfig, init_parallel
    from ark_mega.models.decode_step import DecodeKernels
    from ark_mega.opd.generate import generate
    from ark_mega.transcribe import blocked_ids

    init_parallel(ParallelConfig())
    model, prompts = random_model(args.preset, toy_tokenizer(), dtype, dev, tiny=args.smoke)
    model.eval()
    frames = int(args.seconds * 100)
    gen = torch.Generator().manual_seed(0)
    mel = model.cfg.encoder.num_mel_bins
    feats = [torch.randn(mel, frames, generator=gen).to(dev, dtype) for _ in range(args.batch)]
    ids = [prompts.build(frames).input_ids for _ in range(args.batch)]
    blocked = blocked_ids(prompts, model.cfg.decoder.vocab_size).to(dev)
    blocked[prompts.stop_id] = True

    def run(new_tokens: int, cuda_graph: bool = True, kernels=DecodeKernels()
            ) -> tuple[float, bool]:
        """Seconds of one rollout, and whether its steps replayed a CUDA graph."""
        sync(dev)
        t0 = time.perf_counter()
        out = generate(model, ids, feats, prompts.stop_id,
                       GenerationConfig(max_new_tokens=new_tokens, top_k=8,
                                        cuda_graph=cuda_graph), blocked, kernels=kernels)
        sync(dev)
        assert all(len(t) == new_tokens for t in out.tokens), "a row stopped early"
        return time.perf_counter() - t0, out.cuda_graph

    def steady_tokens_per_s(cuda_graph: bool, kernels=DecodeKernels()
                            ) -> tuple[float, float, bool]:
        """Tokens/s of the steps after the first two (rollouts of shapes decoded before: with a
        graph, replays from their first step), from the median over --repeats pairs of a full
        and a 3-token rollout: the prefill both pay varied by up to ~20 ms between run 9's
        processes, against ~82 ms of steady steps. Also the median full rollout's seconds, and
        whether its steps replayed a graph."""
        pairs = []
        for _ in range(args.repeats):
            seconds, graphed = run(args.new_tokens, cuda_graph, kernels)
            pairs.append((seconds - run(3, cuda_graph, kernels)[0], seconds))
        steps_s = statistics.median(p[0] for p in pairs)
        rollout_s = statistics.median(p[1] for p in pairs)
        return args.batch * (args.new_tokens - 3) / max(steps_s, 1e-9), rollout_s, graphed

    def default_figures() -> dict:
        graph_error = None
        try:  # the first rollout of its shape: kernels compiled, eager warm-up, graph captured
            first_s, _ = run(args.new_tokens)
        except RuntimeError as e:  # a failed capture: still measure eager decoding, and say why
            if dev.type != "cuda":
                raise
            graph_error = str(e)[-1000:]
            first_s, _ = run(args.new_tokens, cuda_graph=False)
        run(3, cuda_graph=graph_error is None)  # its shape too, should its cache length differ
        # step 1 picks from the prefill's logits: no decoding step
        prefill_s, _ = run(1, cuda_graph=graph_error is None)
        tokens_per_s, rollout_s, cuda_graph = steady_tokens_per_s(graph_error is None)
        eager = steady_tokens_per_s(False)[0] if dev.type == "cuda" else None
        return {"prefill_s": prefill_s, "decode_tokens_per_s": tokens_per_s,
                "decode_ms_per_step": 1e3 * args.batch / tokens_per_s,
                "rollout_decode_tokens_per_s":
                    args.batch * (args.new_tokens - 1) / max(rollout_s - prefill_s, 1e-9),
                "first_rollout_extra_s": first_s - rollout_s,
                "cuda_graph": cuda_graph, "graph_error": graph_error,
                "eager_decode_tokens_per_s": eager, "fraction_of_floor": tokens_per_s / floor}

    bandwidth = copy_gbps(dev, mib=1024 if dev.type == "cuda" else 64) * 1e9
    weights = decoder_weight_bytes(model)
    floor = args.batch * bandwidth / weights
    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)",
        "setup": {"preset": args.preset, "batch": args.batch, "seconds": args.seconds,
                  "new_tokens": args.new_tokens, "dtype": str(dtype),
                  "layers": model.transformer_impl},
        "decoder_weight_gib": weights / 2**30, "copy_gbps": bandwidth / 1e9,
        "floor_tokens_per_s": floor,
    }
    try:
        result.update(default_figures())
    except Exception as e:  # noqa: BLE001 - the default kernels failed: still time the others
        traceback.print_exc()
        result["error"] = one_line(e)
    report(result, args.out)
    if args.profile and "error" not in result:  # a whole rollout, then its steady steps apart
        rollout = write_profile(args.profile, lambda: run(args.new_tokens), dev)
        write_difference_profile(args.profile, rollout, lambda: run(3), args.new_tokens - 3, dev,
                                 "steady decoding step")
    # alternatives to the default kernels: what ran before each rewrite since run 8, all of
    # them together (run 8's step), and the greedy pick in chunks of ~2,048 ids. After the
    # default's figures are on disk: one that fails (a kernel's first run on a device) is
    # recorded, and the others still run (unless the failure was a CUDA error that leaves the
    # device unusable: then they fail too).
    variants = {"one_split_attention": DecodeKernels(attention_splits=1),
                "cublas_mlp": DecodeKernels(fused_mlp=False),
                "cublas_projections": DecodeKernels(split_k_projections=False),
                "run8_step": DecodeKernels(attention_splits=1, fused_mlp=False,
                                           split_k_projections=False),
                "chunked_pick": DecodeKernels(pick_chunk=2048)}
    graphs = result.get("graph_error") is None
    result["variants_ms_per_step"] = timed = {}
    for name, kernels in variants.items():
        try:
            for tokens in (args.new_tokens, 3):  # first rollouts of its steps, as above
                run(tokens, graphs, kernels)
            timed[name] = 1e3 * args.batch / steady_tokens_per_s(graphs, kernels)[0]
        except Exception as e:  # noqa: BLE001 - any failure is the variant's result
            timed[name] = f"failed: {one_line(e)}"
        print(f"variant {name}: {timed[name]} ms per step", flush=True)
        write_json(result, args.out)
    return 1 if "error" in result else 0


def one_line(e: Exception) -> str:
    """An error for gpu_check's table: its type and the end of its message, on one line."""
    return f"{type(e).__name__}: " + " ".join(str(e).split())[-300:]


if __name__ == "__main__":
    sys.exit(main())
