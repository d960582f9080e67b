"""Per-step training metrics: stdout with a progress bar, metrics.jsonl and TensorBoard; after a
resume each step is logged once."""

from __future__ import annotations

import json
import os
import time


class MetricsLog:
    """Per-step metrics to stdout (with progress), a JSONL file and TensorBoard; one writer."""

    def __init__(self, out_dir: str, name: str, total_steps: int, writer: bool,
                 resumed_at: int = 0):
        """`resumed_at`: the step of the checkpoint this run resumed from; what an earlier run
        logged after it (it stopped before its next checkpoint) is dropped, so that every step
        is logged once."""
        self.writer, self.total, self.t0 = writer, total_steps, time.perf_counter()
        self.file = self.tb = None
        if writer:
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, "metrics.jsonl")
            _truncate_metrics(path, resumed_at)
            self.file = open(path, "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter

                # also a fresh start drops what a run stopped before its first checkpoint wrote
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                        purge_step=resumed_at + 1)
            except ImportError:
                print("tensorboard is not installed: metrics go to metrics.jsonl only")
        self.name = name

    def log(self, step: int, metrics: dict) -> None:
        if not self.writer:
            return
        record = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{self.name}/{k}", v, step)
        done = step / max(self.total, 1)
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in record.items() if k in SHOWN)
        print(f"[{self.name}] [{bar}] step {step}/{self.total} {shown}", flush=True)

    def close(self):
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def _truncate_metrics(path: str, last_step: int) -> None:
    """Keep the records of steps <= `last_step` (a run starting afresh, at 0, keeps none). A
    last line without its newline is a write the stopped run did not finish: dropped."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or not line.endswith("\n"):
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}:{number}: not a metrics record ({e})") from e
        if step <= last_step:
            kept.append(line)
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)


SHOWN = ("loss", "ce_loss", "ctc_loss", "vuss", "teacher_mass", "top1_agree", "positions", "rollout_nonempty",
         "fallbacks", "mismatch", "rollout_len", "tokens_per_s", "step_time", "lr",
         "heldout_cer_zh", "heldout_wer_en")
