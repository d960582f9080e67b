"""Check whole manifests the way training reads them, and summarise what is wrong.

    python tools/validate_manifest.py examples/data/train.jsonl [more manifests] [--max-duration 30]

Every record is read and its audio decoded (--no-decode: headers only). Prints a progress bar,
then per manifest the records kept, hours, and each kind of problem with its count and first
occurrence (manifest:line: field). Exits 1 if any record is bad, or with --max-skip-fraction if
more than that fraction is bad.
"""

from __future__ import annotations

import argparse
import os
import sys

from ark_mega.data.manifests import LoadPolicy, load_manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("manifests", nargs="+")
    ap.add_argument("--max-duration", type=float, default=30.0, help="seconds (default 30)")
    ap.add_argument("--no-decode", action="store_true", help="read audio headers only")
    ap.add_argument("--max-skip-fraction", type=float, default=0.0,
                    help="tolerated fraction of bad records (default 0: any bad record fails)")
    args = ap.parse_args()
    policy = LoadPolicy(skip_bad=True, max_skip_fraction=1.0, max_duration=args.max_duration,
                        decode_audio=not args.no_decode)
    failed = False
    for path in args.manifests:  # every manifest is checked, whatever an earlier one gave
        if not os.path.exists(path):
            print(f"{path}: no such file or folder")
            failed = True
            continue
        try:
            cuts, report = load_manifest(path, policy, progress=True)
            hours = sum(c.duration for c in cuts) / 3600
        except (ValueError, OSError, AssertionError) as e:  # unreadable, or nothing usable
            print(f"{path}: not a readable manifest: {e or type(e).__name__}")
            failed = True
            continue
        print(f"{path}: {hours:.3f} h\n{report.summary()}")
        bad = report.fraction > args.max_skip_fraction
        failed |= bad
    return 1 if failed else 0


if __name__ == "__main__":
    from ark_mega.cli import run

    sys.exit(run(main))
