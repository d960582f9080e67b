"""Features, prompts, token-budget sampling and packed batches."""

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

from ark_mega.audio_tokens import aut_audio_tokens, whisper_audio_tokens
from ark_mega.data import (Collator, LogMel, PromptBuilder, TokenBudgetSampler, TokenCounter,
                           infer_language, train_bpe_tokenizer)
from ark_mega.data.manifests import load_manifest

SENTENCES = ["the quick brown fox jumps over the lazy dog", "she sells sea shells",
             "你好世界今天天气很好", "我们一起去学校", "numbers like 42 and 7"] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(SENTENCES, vocab_size=400)


def test_logmel_matches_transformers_whisper_extractor():
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=128)
    gen = np.random.default_rng(0)
    waves = [(gen.standard_normal(n) * 0.1).astype(np.float32) for n in (16000, 23456, 8001, 400)]
    ours = LogMel()([torch.from_numpy(w) for w in waves])  # one batch, different lengths
    for w, o in zip(waves, ours):
        ref = extractor(w, sampling_rate=16000, padding="longest", return_tensors="np")
        ref = ref.input_features[0]
        assert o.shape == ref.shape == (128, len(w) // 160)
        # float32 torch.stft against transformers' float64 numpy STFT
        assert np.abs(o.numpy() - ref).max() < 2e-4


def test_student_prompt_has_one_placeholder_per_audio_embedding(tokenizer):
    p = PromptBuilder.student(tokenizer)
    for frames in (50, 777, 3000):
        prompt = p.build(frames, "she sells sea shells")
        assert prompt.input_ids.count(p.audio_id) == prompt.num_audio == whisper_audio_tokens(frames)
        answer = prompt.input_ids[prompt.num_prompt:]
        assert answer[-1] == p.stop_id
        assert tokenizer.decode(answer[:-1]) == "she sells sea shells"
    assert tokenizer.decode(p.build(100).input_ids, skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n")


def test_teacher_prompt_names_the_inferred_language(tokenizer):
    p = PromptBuilder.teacher(tokenizer)
    prompt = p.build(1234, "你好世界")
    assert prompt.input_ids.count(p.audio_id) == aut_audio_tokens(1234) == 161
    answer = tokenizer.decode(prompt.input_ids[prompt.num_prompt:], skip_special_tokens=False)
    assert answer == "language Chinese<asr_text>你好世界<|im_end|>"
    assert infer_language("hello 世界") == "Chinese" and infer_language("hello world") == "English"


def test_missing_special_token_is_an_error():
    plain = train_bpe_tokenizer(SENTENCES, vocab_size=300, special_tokens=("<|im_end|>",))
    with pytest.raises(ValueError, match="no token '<|audio|>'"):
        PromptBuilder.student(plain)


def fake_cuts(durations, texts):
    cuts = []
    for i, (d, t) in enumerate(zip(durations, texts)):
        rec = Recording(id=f"r{i}", sources=[], sampling_rate=16000,
                        num_samples=int(d * 16000), duration=d)
        cut = MonoCut(id=f"c{i}", start=0, duration=d, channel=0, recording=rec)
        cut.supervisions = [SupervisionSegment(id=f"c{i}", recording_id=f"r{i}", start=0,
                                               duration=d, text=t)]
        cuts.append(cut)
    return CutSet.from_cuts(cuts)


@pytest.fixture(scope="module")
def corpus(tokenizer):
    gen = np.random.default_rng(0)
    durations = np.clip(gen.lognormal(np.log(8), 0.6, 300), 1, 30).round(2)
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(300)]
    return fake_cuts(durations, texts), TokenCounter(PromptBuilder.student(tokenizer))


def batches(sampler):
    return [[c.id for c in b] for b in sampler]


def test_token_budget_is_respected_and_every_cut_used_once(corpus):
    cuts, count = corpus
    sampler = TokenBudgetSampler(cuts, max_tokens=2048, count=count, seed=3)
    got = batches(sampler)
    ids = [i for b in got for i in b]
    assert sorted(ids) == sorted(c.id for c in cuts)
    by_id = {c.id: c for c in cuts}
    for b in got:
        assert sum(count(by_id[i]) for i in b) <= 2048
    assert got == batches(TokenBudgetSampler(cuts, max_tokens=2048, count=count, seed=3))
    assert got != batches(TokenBudgetSampler(cuts, max_tokens=2048, count=count, seed=4))


def test_data_parallel_ranks_get_disjoint_shards(corpus):
    cuts, count = corpus
    shards = [set(i for b in batches(TokenBudgetSampler(cuts, 2048, count, seed=1, rank=r,
                                                        world_size=2)) for i in b)
              for r in range(2)]
    assert shards[0] and shards[1] and not shards[0] & shards[1]


def test_resumed_sampler_continues_exactly(corpus):
    cuts, count = corpus
    full = batches(TokenBudgetSampler(cuts, 2048, count, seed=5))
    first = TokenBudgetSampler(cuts, 2048, count, seed=5)
    it = iter(first)
    seen = [[c.id for c in next(it)] for _ in range(4)]
    state = first.state_dict()
    resumed = TokenBudgetSampler(cuts, 2048, count, seed=5)
    resumed.load_state_dict(state)
    assert seen + batches(resumed) == full
    with pytest.raises(ValueError, match="budget of 2048 tokens, this run 4096"):
        TokenBudgetSampler(cuts, 4096, count, seed=5).load_state_dict(state)


def test_cut_larger_than_the_budget_is_an_error(corpus):
    cuts, count = corpus
    with pytest.raises(ValueError, match="more than a whole batch.s budget of 64"):
        batches(TokenBudgetSampler(cuts, 64, count))


@pytest.fixture
def real_cuts(tmp_path):
    rows = []
    for i, (secs, text) in enumerate([(1.0, "she sells sea shells"), (2.3, "你好世界"),
                                      (0.7, "the lazy dog")]):
        t = np.arange(int(secs * 16000)) / 16000
        sf.write(tmp_path / f"{i}.flac", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32),
                 16000)
        rows.append(f'{{"audio": "{i}.flac", "text": "{text}"}}')
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return list(load_manifest(str(tmp_path / "m.jsonl"))[0])


def test_packed_batch_layout(tokenizer, real_cuts):
    prompts = PromptBuilder.student(tokenizer)
    batch = Collator(prompts, pad_to=300)(CutSet.from_cuts(real_cuts))
    assert batch.input_ids.shape == (1, 300)
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    assert len(lengths) == 4 and sum(lengths[:3]) == batch.num_tokens  # 3 utterances + filler
    assert batch.efficiency == pytest.approx(batch.num_tokens / 300)
    for i, text in enumerate(batch.texts):
        a, b = batch.cu_seqlens[i].item(), batch.cu_seqlens[i + 1].item()
        ids, labels, mask = batch.input_ids[0, a:b], batch.labels[0, a:b], batch.loss_mask[0, a:b]
        assert torch.equal(labels[:-1], ids[1:])  # next-token targets within the utterance
        assert ids.tolist().count(prompts.audio_id) == whisper_audio_tokens(
            batch.audio_features[i].shape[-1])
        # the masked targets are exactly the answer and the stop token
        assert tokenizer.decode(labels[mask].tolist()[:-1]) == text
        assert labels[mask][-1] == prompts.stop_id and not mask[-1]
    assert not batch.loss_mask[0, sum(lengths[:3]):].any()


def test_padded_batch_holds_the_same_utterances(tokenizer, real_cuts):
    prompts = PromptBuilder.student(tokenizer)
    packed = Collator(prompts)(CutSet.from_cuts(real_cuts))
    padded = Collator(prompts, packed=False)(CutSet.from_cuts(real_cuts))
    assert padded.cu_seqlens is None and padded.input_ids.shape[0] == 3
    cu = packed.cu_seqlens.tolist()
    for i in range(3):
        n = cu[i + 1] - cu[i]
        assert torch.equal(padded.input_ids[i, :n], packed.input_ids[0, cu[i]:cu[i + 1]])
        assert torch.equal(padded.loss_mask[i, :n], packed.loss_mask[0, cu[i]:cu[i + 1]])
        assert not padded.loss_mask[i, n:].any()
    assert packed.efficiency == 1.0 and padded.efficiency < 1.0


def test_demo_corpus_loads_with_every_check():
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cuts, report = load_manifest(os.path.join(root, "examples", "data", "heldout.jsonl"))
    assert report.total == len(list(cuts)) == 200 and not report.skipped
    assert {c.supervisions[0].language for c in cuts} == {"en", "zh"}


def test_validate_manifest_tool_reports_and_fails_on_bad_records(tmp_path, real_cuts):
    import subprocess
    import sys

    m = tmp_path / "m.jsonl"  # the three good records of real_cuts, then a bad one
    m.write_text(m.read_text(encoding="utf-8") + '{"audio": "missing.flac", "text": "x"}\n',
                 encoding="utf-8")
    root = __file__.rsplit("/tests/", 1)[0]
    (tmp_path / "empty").mkdir()
    # a missing manifest and an empty folder first: named, and the next manifest still checked
    proc = subprocess.run([sys.executable, "tools/validate_manifest.py", str(tmp_path / "nowhere.jsonl"),
                           str(tmp_path / "empty"), str(m)], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{tmp_path / 'nowhere.jsonl'}: no such file or folder" in proc.stdout
    assert f"{tmp_path / 'empty'}: not a readable manifest" in proc.stdout
    assert "3 of 4 records kept" in proc.stdout
    assert "audio_missing: 1" in proc.stdout and f"{m}:4: field 'audio'" in proc.stdout
