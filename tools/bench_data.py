"""Benchmark the data pipeline: packing efficiency and loader throughput (CPU).

    python tools/bench_data.py [--budget 8192] [--utterances 40000] [--workers 2]
    python tools/bench_data.py --scale 1000000        # start-up at scale (streaming vs eager)

1. Packing efficiency (real decoder tokens / tokens processed) of the token-budget sampler's
   batches on a LibriSpeech-like duration distribution (1-35 s, synthesised cuts, transcripts of
   about 2.7 words per second): packed batches padded to the fixed budget (the shape pipeline
   stages exchange) against padded [B, max_len] batches of the same utterances.
2. Loader throughput in utterances/s: the demo corpus (examples/data/train.jsonl) through
   torch's DataLoader with the sampler, FLAC decoding, log-mel features and tokenisation.
3. With `--scale N`: start-up at scale. A synthetic N-line reference manifest pointing at the
   demo audio; the time from start to the first training batch and the peak resident memory of
   the training data path (`ManifestStream`, the sampler, the loader), each in a fresh process,
   against the eager path (`load_manifest`: every record read and decoded up front) on sizes
   where it still finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

from ark_mega.data import (Collator, CutBatches, LoadPolicy, PromptBuilder, TokenBudgetSampler,
                           TokenCounter, load_manifest, train_bpe_tokenizer)
from ark_mega.data.stream import ManifestStream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def librispeech_like(n: int, words: list[str], seed: int = 0) -> CutSet:
    gen = np.random.default_rng(seed)
    durations = np.clip(gen.gamma(4.0, 3.2, n), 1.0, 35.0)  # mean ~12.8 s, long tail to 35 s
    cuts = []
    for i, d in enumerate(durations):
        text = " ".join(gen.choice(words, max(1, int(d * 2.7))))
        rec = Recording(id=f"r{i}", sources=[], sampling_rate=16000, num_samples=int(d * 16000),
                        duration=float(d))
        cut = MonoCut(id=f"c{i}", start=0, duration=float(d), channel=0, recording=rec)
        cut.supervisions = [SupervisionSegment(id=f"c{i}", recording_id=f"r{i}", start=0,
                                               duration=float(d), text=text)]
        cuts.append(cut)
    return CutSet.from_cuts(cuts)


def packing(cuts: CutSet, count: TokenCounter, budget: int, seed: int) -> dict:
    real = packed = padded = n_batches = 0
    for batch in TokenBudgetSampler(cuts, budget, count, seed=seed):
        lengths = [count(c) for c in batch]
        real += sum(lengths)
        packed += budget
        padded += len(lengths) * max(lengths)
        n_batches += 1
    return {"batches": n_batches, "packed_efficiency": real / packed,
            "padded_efficiency": real / padded}


def throughput(prompts: PromptBuilder, budget: int, workers: int, epochs: int) -> float:
    cuts, _ = load_manifest(os.path.join(ROOT, "examples", "data", "train.jsonl"))
    sampler = TokenBudgetSampler(cuts, budget, TokenCounter(prompts), seed=0)
    loader = torch.utils.data.DataLoader(CutBatches(Collator(prompts, pad_to=budget)),
                                         sampler=sampler, batch_size=None, num_workers=workers)
    n, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            n += len(batch.cut_ids)
    return n / (time.perf_counter() - t0)


def scale_manifest(lines: int, folder: str) -> str:
    """A reference manifest of `lines` records cycling through the demo's train utterances."""
    src = os.path.join(ROOT, "examples", "data", "train.jsonl")
    rows = [json.loads(line) for line in open(src, encoding="utf-8")]
    for r in rows:
        r["audio"] = os.path.join(ROOT, "examples", "data", r["audio"])
    encoded = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
    path = os.path.join(folder, f"scale_{lines}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            f.write(encoded[i % len(encoded)])
    return path


def first_batch(manifest: str, mode: str, budget: int) -> dict:
    """In this process: start -> first batch of the training data path, and peak RSS."""
    t0 = time.perf_counter()
    tokenizer = train_bpe_tokenizer(["seven thirty five", "七点三十五分"], vocab_size=300)
    prompts = PromptBuilder.student(tokenizer)
    if mode == "stream":
        cuts = ManifestStream(manifest, LoadPolicy()).cuts()
    else:
        cuts, _ = load_manifest(manifest)
    sampler = TokenBudgetSampler(cuts, budget, TokenCounter(prompts), seed=0)
    loader = torch.utils.data.DataLoader(CutBatches(Collator(prompts)), sampler=sampler,
                                         batch_size=None, num_workers=0)
    batch = next(iter(loader))
    return {"seconds": time.perf_counter() - t0, "utterances": len(batch.cut_ids),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def scale(lines: int, eager_lines: list[int], budget: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        runs = [("stream", lines)] + [("eager", n) for n in eager_lines]
        for mode, n in runs:
            manifest = scale_manifest(n, folder)
            out = subprocess.run([sys.executable, __file__, "--first-batch", manifest,
                                  "--mode", mode, "--budget", str(budget)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{mode:6s} {n:>9,} lines: first batch after {r['seconds']:.1f} s "
                  f"({r['utterances']} utterances), peak RSS {r['peak_rss_gib']:.2f} GiB",
                  flush=True)
            os.remove(manifest)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=8192, help="decoder tokens per batch")
    ap.add_argument("--utterances", type=int, default=40000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="passes over the demo corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, help="start-up at scale: manifest lines (streamed)")
    ap.add_argument("--eager-lines", type=int, nargs="*", default=[2500, 10000],
                    help="with --scale: the eager path's sizes")
    ap.add_argument("--first-batch", help=argparse.SUPPRESS)  # one measurement, in a subprocess
    ap.add_argument("--mode", choices=("stream", "eager"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.first_batch:
        print(json.dumps(first_batch(args.first_batch, args.mode, args.budget)))
        return 0
    if args.scale:
        scale(args.scale, args.eager_lines, args.budget)
        return 0

    texts = [line.split('"text": "')[1].split('"')[0] for split in ("train", "heldout")
             for line in open(os.path.join(ROOT, "examples", "data", f"{split}.jsonl"),
                              encoding="utf-8")]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=2000)
    prompts = PromptBuilder.student(tokenizer)
    words = sorted({w for t in texts for w in t.split() if w.isascii()})

    stats = packing(librispeech_like(args.utterances, words, args.seed), TokenCounter(prompts),
                    args.budget, args.seed)
    print(f"packing, {args.utterances} utterances of 1-35 s, budget {args.budget} tokens: "
          f"{stats['batches']} batches, packed efficiency {stats['packed_efficiency']:.3f}, "
          f"padded efficiency {stats['padded_efficiency']:.3f}")
    ups = throughput(prompts, min(args.budget, 2048), args.workers, args.epochs)
    print(f"loader throughput on examples/data/train.jsonl, {args.workers} workers: "
          f"{ups:.0f} utterances/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
