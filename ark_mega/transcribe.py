"""Batched transcription with the KV-cache generator: held-out evaluation, the TD stage's teacher
transcripts, tools/transcribe.py."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from lhotse import CutSet
from megatron.core import parallel_state as ps

from .config import GenerationConfig, RunConfig
from .data.batching import Collator, TokenBudgetSampler, TokenCounter
from .data.manifests import load_manifest
from .data.prompts import LANGUAGE_NAMES, PromptBuilder, language_name
from .eval import error_rate
from .models.audio_lm import AudioLM
from .models.decode_step import DecodeStep
from .opd.generate import generate


class EveryNth:
    """The i-th of every n cuts of a (lazy, re-iterable) source, read anew on every pass."""

    def __init__(self, cuts, n: int, i: int):
        self.cuts, self.n, self.i = cuts, n, i

    def __iter__(self):
        for j, cut in enumerate(self.cuts):
            if j % self.n == self.i:
                yield cut


def blocked_ids(prompts: PromptBuilder, vocab_size: int,
                blocked_from: int | None = None) -> torch.Tensor:
    """bool [vocab_size]: every special / control token except the stop token and those the
    answer itself contains (Qwen3-ASR's `<asr_text>`), every id past the tokenizer's vocabulary
    (embedding padding), and every id >= `blocked_from`."""
    tokenizer = prompts.tokenizer
    blocked = torch.zeros(vocab_size, dtype=torch.bool)
    blocked[tokenizer.get_vocab_size(with_added_tokens=True):] = True
    for token in tokenizer.get_added_tokens_decoder().values():
        if token.special:
            blocked[tokenizer.token_to_id(token.content)] = True
    if blocked_from is not None:
        if blocked_from < 0:
            raise ValueError(f"blocked_from must be at least 0, got {blocked_from}")
        blocked[blocked_from:] = True
    blocked[[prompts.stop_id] + prompts.answer_special_ids] = False
    return blocked


def answer_text(prompts: PromptBuilder, ids: list[int]) -> str:
    """The transcript in a generated answer (after Qwen3-ASR's `language X<asr_text>`)."""
    decoded = prompts.tokenizer.decode(ids, skip_special_tokens=False)
    literal = prompts.template.answer.split("{text}")[0].split("}")[-1]
    if literal and literal in decoded:
        decoded = decoded.split(literal, 1)[1]
    return prompts.tokenizer.decode(prompts.encode(decoded)).strip()


@torch.no_grad()
def transcribe(model: AudioLM, prompts: PromptBuilder, cuts: CutSet, blocked: torch.Tensor,
               max_new_tokens: int = 256, batch_tokens: int = 8192,
               on_batch=None, stop=None) -> dict[str, str]:
    """{cut id: transcript} for every cut, on every rank. Data-parallel ranks split the cuts;
    the ranks of one model replica decode the same batches together. `on_batch(texts,
    seconds)` is called after each of this rank's batches with its {cut id: transcript}
    (progress, real-time factor, incremental output). `stop()`, asked after each batch, ends
    this rank's decoding when true (the ranks of a replica must agree); what was decoded is
    returned."""
    device = next(model.parameters()).device
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = CutSet(EveryNth(cuts, dp, dp_rank))  # every cut goes to exactly one DP rank, lazily
    any_cut = next(iter(share), None) is not None
    sampler = TokenBudgetSampler(share, batch_tokens, TokenCounter(prompts),
                                 shuffle=False) if any_cut else []
    collate = Collator(prompts)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, top_k=1)
    mine = {}
    for batch_cuts in sampler:
        t0 = time.perf_counter()
        batch = collate(batch_cuts)
        feats = [f.to(device) for f in batch.audio_features]
        out = generate(model, [prompts.build(f.shape[-1]).input_ids for f in feats], feats,
                       prompts.stop_id, cfg, blocked.to(device))
        texts = {cid: answer_text(prompts, toks) for cid, toks in zip(batch.cut_ids, out.tokens)}
        mine.update(texts)
        if on_batch is not None:
            on_batch(texts, time.perf_counter() - t0)
        if stop is not None and stop():
            break
    DecodeStep.release(model)  # batch shapes a training run's rollouts will not see again
    if dp == 1:
        return mine
    gathered = [None] * dp
    dist.all_gather_object(gathered, mine, group=ps.get_data_parallel_group())
    return {k: v for part in gathered for k, v in part.items()}


def evaluate(model: AudioLM, prompts: PromptBuilder, manifest: str, cfg: RunConfig) -> dict:
    """Corpus CER on the Mandarin and WER on the English utterances of a manifest (language
    from each utterance's `language`, as a code or a name, else from its reference text, as
    prompts do); an utterance of another language is an error, not left out."""
    cuts, _ = load_manifest(manifest)
    languages = {c.id: _scored_language(c.supervisions[0]) for c in cuts}
    other = sorted({lang for lang in languages.values() if lang not in ("zh", "en")})
    if other:
        raise ValueError(f"{manifest}: held-out evaluation scores Mandarin (CER) and English "
                         f"(WER); {sum(lang in other for lang in languages.values())} "
                         f"utterances have language {other}")
    blocked = blocked_ids(prompts, model.cfg.decoder.vocab_size,
                          cfg.opd.blocked_from)
    hyps = transcribe(model, prompts, cuts, blocked, cfg.opd.generation.max_new_tokens,
                      cfg.eval_batch_tokens)
    out = {}
    for lang, metric in (("zh", "cer"), ("en", "wer")):
        sel = [c for c in cuts if languages[c.id] == lang]
        if sel:
            rate = error_rate([c.supervisions[0].text for c in sel], [hyps[c.id] for c in sel], metric)
            out[f"{metric}_{lang}"] = rate.rate
    return out


def _scored_language(supervision) -> str:
    """The utterance's language code as the prompts take its language (names in any case)."""
    name = language_name(supervision.language, supervision.text)
    return _LANGUAGE_CODES.get(name.lower(), name)


_LANGUAGE_CODES = {name.lower(): code for code, name in LANGUAGE_NAMES.items()}
