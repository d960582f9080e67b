"""Run configs: every shipped config loads, and a value out of its range is an error naming the
setting, the range and the value."""

import glob
import os

import pytest

from ark_mega.config import load_config
from opd_setup import ROOT


RUN_CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "examples", "configs", "*.yaml"))
                     if os.path.basename(p) != "demo.yaml")  # the demo's plan: tests/test_demo.py


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=os.path.basename)
def test_shipped_run_configs_load(path):
    load_config(path)


@pytest.mark.parametrize("override,message", [
    ("optim.lr=-1", "optim.lr must be positive, got -1.0"),
    ("optim.warmup_steps=-2", "optim.warmup_steps must be at least 0, got -2"),
    ("optim.adam_beta2=1.0", r"optim.adam_beta2 must be in \[0, 1\), got 1.0"),
    ("optim.schedule=linear", "optim.schedule must be constant or cosine, got 'linear'"),
    ("opd.blocked_from=-5", r"opd.blocked_from must be at least 0 \(or null\), got -5"),
    ("dtype=fp16", "dtype must be auto, bf16 or fp32, got 'fp16'"),
    ("stage=rl", "stage must be sft, td or opd, got 'rl'"),
    ("steps=0", "steps must be at least 1, got 0"),
    ("keep_last=-1", "keep_last must be at least 0, got -1"),
    ("data.subset=0", r"data.subset must be in \(0, 1\], got 0.0"),
    ("data.max_tokens=0", "data.max_tokens must be at least 1, got 0"),
    ("data.micro_batches=0", "data.micro_batches must be at least 1, got 0"),
    ("opd.top_k=0", "opd.top_k must be at least 1, got 0"),
    ("opd.generation.top_p=2", r"opd.generation.top_p must be in \(0, 1\], got 2.0"),
    ("opd.generation.max_new_tokens=0", "opd.generation.max_new_tokens must be at least 1, got 0"),
])
def test_a_setting_out_of_range_is_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["stage=sft", override])
