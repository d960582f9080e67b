"""Benchmark the data pipeline: packing efficiency and loader throughput (CPU).

    python tools/bench_data.py [--budget 8192] [--utterances 40000] [--workers 2]

1. Packing efficiency (real decoder tokens / tokens processed) of the token-budget sampler's
   batches on a LibriSpeech-like duration distribution (1-35 s, synthesised cuts, transcripts of
   about 2.7 words per second): packed batches padded to the fixed budget (the shape pipeline
   stages exchange) against padded [B, max_len] batches of the same utterances.
2. Loader throughput in utterances/s: the demo corpus (examples/data/train.jsonl) through
   torch's DataLoader with the sampler, FLAC decoding, log-mel features and tokenisation.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

from ark_mega.data import (Collator, CutBatches, PromptBuilder, TokenBudgetSampler, TokenCounter,
                           load_manifest, train_bpe_tokenizer)

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=8192, help="decoder tokens per batch")
    ap.add_argument("--utterances", type=int, default=40000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="passes over the demo corpus")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

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
