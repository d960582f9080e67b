"""Models that listen. Parity with transformers cannot show that an encoder passes its audio on
(both sides load the same weights): at initialisation each encoder's output must follow its
input, and after a short SFT on demo utterances the loss with each utterance's own audio must
be clearly below the loss with another utterance's audio."""

import os

import pytest
import torch
from lhotse import CutSet

from ark_mega.data import Collator, PromptBuilder, load_manifest
from ark_mega.data.batching import cut_text
from opd_setup import ROOT, model, tokenizer

BUILDERS = {"tiny_ark_asr": PromptBuilder.student, "tiny_qwen3_asr": PromptBuilder.teacher}


@pytest.fixture(scope="module")
def cuts():
    """8 training utterances, English and Mandarin."""
    found, _ = load_manifest(os.path.join(ROOT, "examples", "data", "train.jsonl"))
    found = list(found)
    return found[:4] + found[-4:]


def features(cuts):
    return Collator(PromptBuilder.student(tokenizer()))(CutSet.from_cuts(cuts)).audio_features


@pytest.mark.parametrize("name", list(BUILDERS))
def test_encoder_output_follows_its_audio_at_initialisation(single_rank, cuts, name):
    prompts = BUILDERS[name](tokenizer())
    encoder = model(name, prompts, seed=0).encoder
    feats = features(cuts[:1] + cuts[-1:])
    frames = min(f.shape[-1] for f in feats)
    a, b = (f[:, :frames] for f in feats)
    with torch.no_grad():
        out_a, out_b, out_const = (encoder([x])[0] for x in (a, b, torch.full_like(a, a.mean())))
    assert ((out_a - out_b).norm() / out_a.norm()).item() > 0.3
    assert ((out_a - out_const).norm() / out_a.norm()).item() > 0.3


def loss_of(m, prompts, cuts, feats, audio_of):
    """Mean cross-entropy of the transcripts, utterance i heard through audio_of[i]'s features."""
    built = [prompts.build(feats[j].shape[-1], cut_text(c), c.supervisions[0].language)
             for c, j in zip(cuts, audio_of)]
    batch = Collator(prompts).batch(built, [feats[j] for j in audio_of], [c.id for c in cuts],
                                    [cut_text(c) for c in cuts])
    logits = m(batch.input_ids, batch.audio_features, batch.cu_seqlens)[:, 0]
    losses = torch.nn.functional.cross_entropy(logits.float(), batch.labels[0], reduction="none")
    return losses[batch.loss_mask[0]].mean()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_short_sft_learns_to_use_the_audio(single_rank, cuts, name):
    prompts = BUILDERS[name](tokenizer())
    m = model(name, prompts, seed=0)
    feats = features(cuts)
    own = list(range(len(cuts)))
    optimizer = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(120):
        optimizer.zero_grad()
        loss_of(m, prompts, cuts, feats, own).backward()
        optimizer.step()
    with torch.no_grad():
        real = loss_of(m, prompts, cuts, feats, own).item()
        foreign = loss_of(m, prompts, cuts, feats, own[1:] + own[:1]).item()
    assert real < 0.5 * foreign, (real, foreign)
