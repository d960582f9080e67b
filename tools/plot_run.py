"""Plot a run: its metrics over steps, and the demo's error rates per stage, as PNG files.

    python tools/plot_run.py runs/demo                  # -> runs/demo/summary.png
    python tools/plot_run.py runs/my_opd --out opd.png

See `ark_mega/plots.py` for what is drawn.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    from ark_mega.plots import plot_run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", help="PNG file (default: RUN_DIR/summary.png)")
    args = ap.parse_args()
    if not os.path.isdir(args.run_dir):
        print(f"{args.run_dir}: no such folder", file=sys.stderr)
        return 2
    try:
        print(plot_run(args.run_dir, args.out or os.path.join(args.run_dir, "summary.png")))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from ark_mega.cli import run

    sys.exit(run(main))
