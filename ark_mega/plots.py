"""Pictures of a run: its metrics over steps, and the demo's error rates per stage (PNG).

RUN_DIR is a run's output_dir (its `metrics.jsonl`) or a folder of runs (each sub-folder's
`metrics.jsonl`, as the demo writes one per stage) with an optional `results.json` (the demo's
table). Panels: loss; VUSS; teacher/student agreement (teacher mass inside the union, top-1
agreement); held-out CER / WER at the steps they were evaluated; CER / WER per stage as bars.
Panels without data are left out. `tools/plot_run.py` is the command line.
"""

from __future__ import annotations

import json
import os

PANELS = [
    ("loss", ("loss",)),
    ("VUSS (valid union ids per position)", ("vuss",)),
    ("agreement", ("teacher_mass", "top1_agree")),
    ("held-out error rate", ("heldout_cer_zh", "heldout_wer_en")),
]


def read_metrics(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg}, column {e.colno})") from None
    return records


def runs_of(root: str) -> dict[str, list[dict]]:
    """{run name: its metrics}: the folder itself, or each sub-folder with a metrics.jsonl."""
    if os.path.isfile(os.path.join(root, "metrics.jsonl")):
        return {os.path.basename(os.path.normpath(root)): read_metrics(os.path.join(root, "metrics.jsonl"))}
    found = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "metrics.jsonl")
        if os.path.isfile(path):
            found[name] = read_metrics(path)
    return found


def plot_run(root: str, out: str) -> str:
    """Write the PNG `out` for the run(s) in `root`; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = runs_of(root)
    results_path = os.path.join(root, "results.json")
    results = json.load(open(results_path, encoding="utf-8")) if os.path.isfile(results_path) else None
    panels = [(title, keys) for title, keys in PANELS
              if any(k in r for records in runs.values() for r in records for k in keys)]
    if not panels and not results:
        raise ValueError(f"{root}: no metrics.jsonl (or results.json) with anything to plot")
    count = len(panels) + (1 if results else 0)
    fig, axes = plt.subplots(count, 1, figsize=(8, 2.6 * count), squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for name, records in runs.items():
            for key in keys:
                points = [(r["step"], r[key]) for r in records if key in r]
                if points:
                    steps, values = zip(*points)
                    label = key if len(runs) == 1 else f"{name}: {key}"
                    ax.plot(steps, values, marker="." if len(points) < 30 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if results:
        ax = axes[-1, 0]
        names = [r["model"] for r in results]
        xs = range(len(names))
        for offset, key, label in ((-0.2, "cer_zh", "CER zh"), (0.2, "wer_en", "WER en")):
            ax.bar([x + offset for x in xs], [100 * r.get(key, float("nan")) for r in results],
                   width=0.4, label=label)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=15, fontsize=7, ha="right")
        ax.set_ylabel("% (held-out)")
        ax.set_title("error rate per stage")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
