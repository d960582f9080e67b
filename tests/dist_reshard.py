"""Run under torchrun: load a checkpoint at the given TP / PP layout and save it again at that
layout (tests/test_hf_io.py exports the result).

    torchrun --nproc_per_node 2 tests/dist_reshard.py SRC DST --tp 2 --pp 1
"""

import argparse
import sys

from ark_mega import checkpoint
from ark_mega.distributed import ParallelConfig, init_parallel
from ark_mega.models import AudioLM
from dist_common import finish


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    args = ap.parse_args()
    init_parallel(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp))
    model = AudioLM(checkpoint.model_config(args.src))
    checkpoint.load(args.src, model)
    checkpoint.save(args.dst, 1, model)
    return finish(True)


if __name__ == "__main__":
    sys.exit(main())
