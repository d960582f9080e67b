"""A tiny student, a tiny teacher and a few demo utterances for the OPD tests (in-process and
under torchrun). The teacher has random weights: the tests check the mechanics, not learning."""

from __future__ import annotations

import json
import os

import torch
from lhotse import CutSet

from ark_mega.config import GenerationConfig, OPDSettings
from ark_mega.data import Collator, PromptBuilder, load_manifest, train_bpe_tokenizer
from ark_mega.models import AudioLM, preset
from ark_mega.opd.steps import OPDStep
from ark_mega.opd.token_map import TokenMap
from ark_mega.transcribe import blocked_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 384


def demo_texts(split="train"):
    with open(os.path.join(ROOT, "examples", "data", f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def tokenizer(vocab=300, split="train"):
    return train_bpe_tokenizer(demo_texts(split), vocab)


def model(name, prompts, seed, scale=1.0, kv_heads=None, **build):
    cfg = preset(name)
    cfg.decoder.vocab_size = VOCAB
    if kv_heads:
        cfg.decoder.num_kv_heads = kv_heads
    cfg.encoder.num_mel_bins = 128
    cfg.audio_token_id = prompts.audio_id
    torch.manual_seed(seed)
    m = AudioLM(cfg, **build)
    if scale != 1.0:  # larger random weights: outputs that vary from token to token
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(scale)
    return m


def batch(sp, n=3, start=0):
    """A packed batch of held-out utterances start .. start + n - 1."""
    cuts, _ = load_manifest(os.path.join(ROOT, "examples", "data", "heldout.jsonl"))
    return Collator(sp)(CutSet.from_cuts(list(cuts)[start:start + n]))


def opd_step(student, teacher_tokenizer=None, top_k=8, max_new_tokens=10, fallback=False,
             temperature=1.0, divergence="forward_kl", beta=0.5):
    s_tok = tokenizer()
    t_tok = teacher_tokenizer or s_tok
    sp, tp = PromptBuilder.student(s_tok), PromptBuilder.teacher(t_tok)
    teacher = model("tiny_qwen3_asr", tp, seed=1, scale=3.0).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    settings = OPDSettings(top_k=top_k, fallback_to_reference=fallback, temperature=temperature,
                           divergence=divergence, jsd_beta=beta, generation=GenerationConfig(max_new_tokens=max_new_tokens, top_k=top_k))
    step = OPDStep(student, teacher, sp, tp, TokenMap(s_tok, t_tok, VOCAB, VOCAB), settings,
                   blocked_ids(sp, VOCAB))
    return step, sp, teacher


def stop_at_once(step, sp) -> None:
    """Only the stop token can be generated: every rollout of `step` is empty."""
    step.blocked = torch.ones_like(step.blocked)
    step.blocked[sp.stop_id] = False
