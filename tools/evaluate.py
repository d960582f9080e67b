"""Score transcripts by CER (Mandarin) or WER (English), corpus level, with a report.

    python tools/evaluate.py --hypotheses hyp.jsonl --metric cer --out-dir runs/eval/aishell1
    python tools/evaluate.py --hypotheses hyp.jsonl --references test.jsonl --metric cer --out-dir D
    python tools/evaluate.py --model CKPT --manifest test.jsonl --metric wer --out-dir runs/eval/x
    python tools/evaluate.py --model CKPT --data-dir data/ --presets aishell1 libri_clean --out-dir runs/eval

Presets (the paper's sets, manifests named test_<preset>.jsonl under --data-dir): aishell1,
wenet_meeting, wenet_net (CER); libri_clean, libri_other (WER). Text is normalised (NFKC,
full-width to half-width, lower case, punctuation removed, whitespace collapsed; CER without
spaces). Rates are corpus level: summed edit operations over summed reference lengths.
Writes <set>.jsonl (per utterance, most errors first) and summary.txt / summary.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from ark_mega.cli import positive_int


def _read_hypotheses(path: str, references: dict[str, str] | None = None
                     ) -> tuple[list[str], list[str], list[str]]:
    """(ids, references, hypotheses) of a transcribe.py JSONL. References come from its rows, or
    joined by id from `references` (id -> text); every problem names the file and line."""
    ids, refs, hyps, seen = [], [], [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
            fields = ("id", "text") if references is not None else ("id", "text", "reference")
            for key in fields:
                if not isinstance(row.get(key), str):
                    raise ValueError(f"{path}:{n}: field {key!r} is missing or not a string")
            cid = row["id"]
            if cid in seen:
                raise ValueError(f"{path}:{n}: id {cid!r} repeats line {seen[cid]}")
            seen[cid] = n
            if references is not None and cid not in references:
                raise ValueError(f"{path}:{n}: id {cid!r} is not in the reference manifest")
            ids.append(cid)
            refs.append(references[cid] if references is not None else row["reference"])
            hyps.append(row["text"])
    if references is not None and len(ids) != len(references):
        missing = [i for i in references if i not in seen]
        raise ValueError(f"{path}: no hypothesis for {len(missing)} reference(s), first {missing[0]!r}")
    return ids, refs, hyps


def main() -> int:
    warnings.filterwarnings("ignore", category=UserWarning)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hypotheses", help="JSONL from tools/transcribe.py (with references)")
    src.add_argument("--manifest", help="a manifest to transcribe with --model and score")
    src.add_argument("--presets", nargs="+", help="preset names (with --data-dir and --model)")
    ap.add_argument("--references", help="with --hypotheses: a manifest whose texts are the "
                                         "references, joined by id (default: the rows' own)")
    ap.add_argument("--model", help="megatron checkpoint or HF folder")
    ap.add_argument("--tokenizer")
    ap.add_argument("--data-dir", default=".")
    ap.add_argument("--metric", choices=["cer", "wer"])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--max-new-tokens", type=positive_int, default=256)
    ap.add_argument("--batch-tokens", type=positive_int, default=8192)
    ap.add_argument("--blocked-from", type=int, default=None,
                    help="with --model: never generate ids >= this (151670 for Ark-ASR)")
    args = ap.parse_args()

    from ark_mega.eval import PRESETS, summarize, tables, utterance_rows, write_rows

    sets = []  # (name, metric, ids, refs, hyps)
    if args.hypotheses:
        if not args.metric:
            ap.error("--metric is required with --hypotheses")
        name = os.path.splitext(os.path.basename(args.hypotheses))[0]
        references = None
        if args.references:
            from ark_mega.data.manifests import LoadPolicy, load_manifest

            cuts, _ = load_manifest(args.references, LoadPolicy(decode_audio=False))
            references = {c.id: c.supervisions[0].text for c in cuts}
        sets.append((name, args.metric, *_read_hypotheses(args.hypotheses, references)))
    else:
        if not args.model:
            ap.error("--model is required with --manifest / --presets")
        if args.presets and args.metric:
            ap.error("--metric applies to --manifest / --hypotheses: each preset has its own")
        from ark_mega.data.manifests import load_manifest
        from ark_mega.distributed import ParallelConfig, init_parallel
        from ark_mega.factory import load_model
        from ark_mega.transcribe import blocked_ids, transcribe

        init_parallel(ParallelConfig())
        model, prompts = load_model(args.model, args.tokenizer)
        blocked = blocked_ids(prompts, model.cfg.decoder.vocab_size, args.blocked_from)
        if args.manifest:
            if not args.metric:
                ap.error("--metric is required with --manifest")
            todo = [(os.path.splitext(os.path.basename(args.manifest))[0], args.manifest, args.metric)]
        else:
            unknown = sorted(set(args.presets) - set(PRESETS))
            if unknown:
                ap.error(f"unknown preset(s) {unknown}; known: {sorted(PRESETS)}")
            todo = [(p, os.path.join(args.data_dir, PRESETS[p][0]), PRESETS[p][1]) for p in args.presets]
        for name, manifest, metric in todo:
            cuts = list(load_manifest(manifest)[0])
            hyps = transcribe(model, prompts, cuts, blocked, args.max_new_tokens, args.batch_tokens)
            sets.append((name, metric, [c.id for c in cuts], [c.supervisions[0].text for c in cuts],
                         [hyps[c.id] for c in cuts]))

    os.makedirs(args.out_dir, exist_ok=True)
    summaries = []
    for name, metric, ids, refs, hyps in sets:
        write_rows(os.path.join(args.out_dir, f"{name}.jsonl"), utterance_rows(ids, refs, hyps, metric))
        summaries.append(summarize(name, refs, hyps, metric))
    text, md = tables(summaries)
    for ext, body in (("txt", text), ("md", md)):
        with open(os.path.join(args.out_dir, f"summary.{ext}"), "w", encoding="utf-8") as f:
            f.write(body + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    from ark_mega.cli import run

    sys.exit(run(main))
