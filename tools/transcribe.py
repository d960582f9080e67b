"""Transcribe audio files or a manifest with a megatron checkpoint or an exported HF folder.

    python tools/transcribe.py --model CKPT_OR_HF_FOLDER audio1.flac audio2.wav --out hyp.jsonl
    python tools/transcribe.py --model CKPT --manifest examples/data/heldout.jsonl --out hyp.jsonl

Batched greedy decoding with a KV cache (the generation code of the OPD rollouts), blocked
special tokens, a progress bar, and JSONL output: id, audio, text, duration, real-time factor
of its batch (decode seconds / audio seconds), and the manifest's reference when it has one.
A bad file (unreadable, silent, longer than --max-duration) stops the run with its name, or
with --skip-bad is listed on stderr and left out while the rest are transcribed.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from tqdm import tqdm

from ark_mega.cli import positive_float, positive_int


def main() -> int:
    warnings.filterwarnings("ignore", category=UserWarning)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("audio", nargs="*", help="audio files")
    ap.add_argument("--manifest", help="a manifest (reference JSONL, NeMo or lhotse)")
    ap.add_argument("--model", required=True, help="megatron checkpoint (folder) or HF folder")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: beside the model)")
    ap.add_argument("--out", required=True, help="JSONL output")
    ap.add_argument("--max-new-tokens", type=positive_int, default=256)
    ap.add_argument("--batch-tokens", type=positive_int, default=8192, help="decoder tokens per batch")
    ap.add_argument("--blocked-from", type=int, default=None, help="never generate ids >= this")
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip unreadable, silent or too long audio (listed), transcribe the rest")
    ap.add_argument("--max-duration", type=positive_float, default=30.0, help="seconds per utterance")
    args = ap.parse_args()
    if bool(args.audio) == bool(args.manifest):
        ap.error("give audio files or --manifest, not both")

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from ark_mega.data.manifests import LoadPolicy, audio_files, load_manifest
    from ark_mega.distributed import ParallelConfig, init_parallel
    from ark_mega.factory import load_model
    from ark_mega.transcribe import blocked_ids, transcribe

    init_parallel(ParallelConfig())
    model, prompts = load_model(args.model, args.tokenizer)
    policy = LoadPolicy(require_text=False, skip_bad=args.skip_bad, max_skip_fraction=1.0,
                        max_duration=args.max_duration)
    cuts, skipped = (load_manifest(args.manifest, policy) if args.manifest
                     else audio_files(args.audio, policy))
    for err in skipped.errors:
        print(f"skipped: {err}", file=sys.stderr)
    by_id = {c.id: c for c in cuts}
    rtf = {}
    # under torchrun each data-parallel rank decodes its share (its bar counts that share)
    with tqdm(total=len(by_id), unit=" utt", desc="transcribing",
              disable=dist.get_rank() != 0) as bar:
        def on_batch(texts, seconds):
            audio = sum(by_id[i].duration for i in texts)
            rtf.update({i: seconds / audio for i in texts})
            bar.update(len(texts))

        texts = transcribe(model, prompts, cuts, blocked_ids(prompts, model.cfg.decoder.vocab_size,
                                                             args.blocked_from),
                           args.max_new_tokens, args.batch_tokens, on_batch)
    if ps.get_data_parallel_world_size() > 1:  # every rank timed its own batches
        parts = [None] * ps.get_data_parallel_world_size()
        dist.all_gather_object(parts, rtf, group=ps.get_data_parallel_group())
        rtf = {cid: value for part in parts for cid, value in part.items()}
    if dist.get_rank() != 0:
        return 0
    with open(args.out, "w", encoding="utf-8") as f:
        for cid, cut in by_id.items():
            sup = cut.supervisions[0]
            row = {"id": cid, "audio": cut.recording.sources[0].source, "text": texts[cid],
                   "duration": round(cut.duration, 3), "rtf": round(rtf[cid], 4)}
            if sup.text:
                row["reference"] = sup.text
            if sup.language:
                row["language"] = sup.language
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    total_rtf = sum(rtf[i] * by_id[i].duration for i in by_id) / sum(c.duration for c in by_id.values())
    print(f"{len(by_id)} utterances -> {args.out} (real-time factor {total_rtf:.3f})"
          + (f"; {len(skipped.errors)} skipped" if skipped.errors else ""))
    return 0


if __name__ == "__main__":  # the model loader may save nothing, but keep the guard for torchrun
    from ark_mega.cli import run

    sys.exit(run(main))
