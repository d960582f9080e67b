"""Parameter counts of the model presets, ours against transformers' for the same shapes.

    python tools/model_sizes.py [--presets ark_asr_0p6b qwen3_asr_1p7b ...]

Both models are built on the meta device (no memory, no initialisation). Our count is of one
TP = PP = 1 replica with tied weights counted once, as transformers counts them, less the
key-bias slots of the fused QKV bias that the Whisper encoder holds at zero (it has no key bias).
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def our_count(cfg) -> int:
    from ark_mega.models import AudioLM
    from ark_mega.models.attention import QKVLinearWithoutKeyBias

    with torch.device("meta"):
        model = AudioLM(cfg, transformer_impl="local")
    held_at_zero = sum(m.key_bias_entries for m in model.modules()
                       if isinstance(m, QKVLinearWithoutKeyBias))
    return sum(p.numel() for p in model.parameters()) - held_at_zero


def hf_count(cfg) -> int:
    from ark_mega.models.families import family

    with torch.device("meta"):
        model = family(cfg.family).transformers_layout.transformers_model(cfg)
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    from ark_mega.distributed import ParallelConfig, init_parallel
    from ark_mega.models.config import preset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+",
                    default=["ark_asr_0p6b", "qwen3_asr_0p6b", "qwen3_asr_1p7b"])
    args = ap.parse_args()
    init_parallel(ParallelConfig())
    print(f"{'preset':<16}{'ours':>16}{'transformers':>16}  equal")
    ok = True
    for name in args.presets:
        cfg = preset(name)
        ours, theirs = our_count(cfg), hf_count(cfg)
        ok &= ours == theirs
        print(f"{name:<16}{ours:>16,}{theirs:>16,}  {ours == theirs}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
