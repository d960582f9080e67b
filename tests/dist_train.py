"""A training run under torchrun: `dist_train.py OUT_DIR [--hold-save STEP] key=value ...`.

With --hold-save, rank 1 stops inside the save of checkpoint STEP (its files written, the
folder still `step_N.tmp`), prints `HOLD <pid>` and waits to be killed: a rank dying mid-save.
"""

import argparse
import os
import sys
import time

from megatron.core import dist_checkpointing

from ark_mega.config import load_config
from ark_mega.opd.trainer import Trainer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hold-save", type=int)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.hold_save:
        save = dist_checkpointing.save

        def held(state, path, *a, **kw):
            out = save(state, path, *a, **kw)
            if f"step_{args.hold_save:06d}.tmp" in str(path) and int(os.environ["RANK"]) == 1:
                print(f"HOLD {os.getpid()}", flush=True)
                time.sleep(600)
            return out

        dist_checkpointing.save = held
    Trainer(load_config(None, args.overrides)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
