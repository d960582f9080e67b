"""Token-budget sampling and packed (or padded) decoder batches.

The budget counts decoder tokens, audio placeholders included: that is what the decoder
processes. `TokenBudgetSampler` is lhotse's DynamicBucketingSampler (length buckets, dynamic
batch sizes, sharded by data-parallel rank, deterministic for a seed) with a
`DecoderTokenBudget` constraint, and a state that a resumed run restores to continue exactly
where it stopped.

`Collator` turns the sampler's cuts into a `Batch`: per-utterance log-mel features for the
encoder, and for the decoder either one packed sequence [1, T] with `cu_seqlens` (no attention
across utterances) or a right-padded [B, S] batch. Labels are next-token targets; the loss mask
covers each utterance's answer and stop token only.
"""

from __future__ import annotations

import bisect
from itertools import islice
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.dataset import DynamicBucketingSampler
from lhotse.dataset.sampling.dynamic_bucketing import estimate_duration_buckets
from lhotse.dataset.sampling.base import SamplingConstraint

from .features import SAMPLE_RATE, LogMel, num_frames
from .manifests import LoadPolicy, ManifestError, sample_problem
from .prompts import Prompt, PromptBuilder


def cut_frames(cut: Cut) -> int:
    return num_frames(int(round(cut.duration * SAMPLE_RATE)))


def cut_text(cut: Cut) -> str:
    return cut.supervisions[0].text


class TokenCounter:
    """Decoder tokens of a cut under a prompt builder (prompt + answer + stop). Counts are kept
    by cut id: the sampler measures every cut several times (bucket edges, batching)."""

    def __init__(self, prompts: PromptBuilder):
        self.prompts = prompts
        self._counts: dict[str, int] = {}

    def __call__(self, cut: Cut) -> int:
        n = self._counts.get(cut.id)
        if n is None:
            p = self.prompts
            n = (len(p.prefix) + p.audio_tokens(cut_frames(cut)) + len(p.suffix)
                 + len(p.answer(cut_text(cut), cut.supervisions[0].language)))
            self._counts[cut.id] = n
        return n


def cut_error(cut: Cut, reason: str, kind: str) -> ManifestError:
    """The error of a checked cut, naming the manifest record it came from."""
    where = cut.supervisions[0].custom or {}
    return ManifestError(where.get("manifest", "?"), where.get("line", 0),
                         where.get("field", "audio"), reason, kind)


def over_budget(cut: Cut, tokens: int, max_tokens: int, setting: str | None = None
                ) -> ManifestError:
    named = f" ({setting})" if setting else ""
    return cut_error(cut, f"needs {tokens} decoder tokens (its audio's, the prompt's and its "
                     f"text's), more than a whole batch's budget of {max_tokens}{named}",
                     "over_token_budget")


class TokenLimit:
    """A stream's check (`ManifestStream(admit=...)`) that a cut fits a batch on its own: one
    that does not is an error, or a counted skip, when it is read, before the sampler meets it."""

    def __init__(self, count: Callable[[Cut], int], max_tokens: int, setting: str | None = None):
        """`setting`: the config setting that gives `max_tokens`, for the error."""
        self.count, self.max_tokens, self.setting = count, max_tokens, setting

    def __call__(self, cut: Cut) -> ManifestError | None:
        n = self.count(cut)
        return over_budget(cut, n, self.max_tokens, self.setting) if n > self.max_tokens else None


@dataclass
class DecoderTokenBudget(SamplingConstraint):
    """At most `max_tokens` decoder tokens per batch, summed (packed batches pay no padding).

    lhotse's sampler adds a cut, then asks whether the batch is close to full; it cannot put a
    cut back. All cuts of a batch come from one length bucket, so the batch is closed as soon
    as one more cut as long as the bucket's upper edge could overflow it: the budget is never
    exceeded. `bins` (the bucket edges) and `longest` (the longest cut) are set by the sampler.
    """

    max_tokens: int
    count: Callable[[Cut], int]
    bins: list = field(default_factory=list)
    longest: int = 0
    current: int = 0
    cap: int = 0  # upper edge of the current batch's bucket

    def add(self, example: Cut) -> None:
        n = self.count(example)
        if n > self.max_tokens:  # a training stream skips these before (`TokenLimit`)
            raise over_budget(example, n, self.max_tokens)
        self.current += n
        self.longest = max(self.longest, n)
        i = bisect.bisect_left(self.bins, n)
        self.cap = max(self.cap, n, self.bins[i] if i < len(self.bins) else self.longest)

    def exceeded(self) -> bool:
        return self.current > self.max_tokens

    def close_to_exceeding(self) -> bool:
        return self.current + self.cap > self.max_tokens

    def reset(self) -> None:
        self.current = self.cap = 0

    def measure_length(self, example: Cut) -> float:
        return self.count(example)


class TokenBudgetSampler(DynamicBucketingSampler):
    """Bucket edges come from the first `bins_estimate` cuts (one pass over a prefix of a lazy
    CutSet), as in lhotse. A later cut longer than all of them raises the last bucket's edge
    from then on; the batch it joins can exceed the budget by its excess over the longest cut
    seen before (a sample of 10,000 makes that rare)."""

    def __init__(self, cuts: CutSet, max_tokens: int, count: Callable[[Cut], int],
                 num_buckets: int = 10, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, bins_estimate: int = 10000):
        budget = DecoderTokenBudget(max_tokens, count)
        sample = list(islice(cuts, bins_estimate))
        if not sample:
            raise ValueError("no cuts to sample from")
        lengths = [count(c) for c in sample]
        # lhotse estimates bucket edges from two cuts at least: one cut gets its edge given
        bins = ([float(lengths[0])] if len(sample) == 1 else
                estimate_duration_buckets(sample, min(num_buckets, len(sample)), budget))
        super().__init__(cuts, constraint=budget, num_buckets=min(num_buckets, len(sample)),
                         duration_bins=bins, shuffle=shuffle, seed=seed, rank=rank,
                         world_size=world_size, drop_last=drop_last)
        budget.bins = list(self.duration_bins)
        budget.longest = max(lengths)

    # lhotse refuses to save the state of a sampler with a custom constraint; the constraint
    # is rebuilt from the run's config, so the state needs only its budget, for a check.
    def state_dict(self) -> dict:
        constraint, self.constraint = self.constraint, None
        try:
            state = super().state_dict()
        finally:
            self.constraint = constraint
        state["max_tokens"] = constraint.max_tokens
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        saved = state.pop("max_tokens")
        if saved != self.constraint.max_tokens:
            raise ValueError(f"the saved sampler used a budget of {saved} tokens, this run "
                             f"{self.constraint.max_tokens}")
        super().load_state_dict(state)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [1, T] packed or [B, S] padded
    labels: torch.Tensor  # same shape: the next token
    loss_mask: torch.Tensor  # same shape: True on answer positions
    cu_seqlens: torch.Tensor | None  # [n + 1] for packed batches (a padding segment last, if any)
    audio_features: list[torch.Tensor]  # per utterance [mel_bins, frames]
    cut_ids: list[str]
    texts: list[str]
    num_tokens: int  # real decoder tokens (no padding)
    skipped: list[ManifestError] = field(default_factory=list)  # cuts the workers dropped

    @property
    def efficiency(self) -> float:
        """Real tokens / tokens processed."""
        return self.num_tokens / self.input_ids.numel()


class Collator:
    """Cuts -> Batch. `pad_to` gives packed batches a fixed length (static shapes); the filler
    is a separate segment that nothing attends across."""

    def __init__(self, prompts: PromptBuilder, features: LogMel | None = None,
                 packed: bool = True, pad_to: int | None = None, pad_id: int | None = None):
        self.prompts, self.packed, self.pad_to = prompts, packed, pad_to
        self.features = features or LogMel()
        self.pad_id = prompts.stop_id if pad_id is None else pad_id

    def __call__(self, cuts: CutSet) -> Batch:
        cuts = list(cuts)
        return self.from_waves(cuts, [c.load_audio()[0] for c in cuts])

    def from_waves(self, cuts: list[Cut], waves: list[np.ndarray]) -> Batch:
        """The Batch of cuts whose audio is already decoded (mono samples at 16 kHz)."""
        feats = self.features([torch.from_numpy(w) for w in waves])
        prompts = [self.prompts.build(f.shape[-1], cut_text(c), c.supervisions[0].language)
                   for c, f in zip(cuts, feats)]
        return self.batch(prompts, feats, [c.id for c in cuts], [cut_text(c) for c in cuts])

    def batch(self, prompts: list[Prompt], feats: list[torch.Tensor], cut_ids: list[str],
              texts: list[str]) -> Batch:
        """The Batch of built prompts and their features (packed or padded)."""
        decoder = self._packed(prompts) if self.packed else self._padded(prompts)
        return Batch(*decoder, audio_features=feats, cut_ids=cut_ids, texts=texts,
                     num_tokens=sum(len(p.input_ids) for p in prompts))

    @staticmethod
    def _targets(p: Prompt) -> tuple[list[int], list[bool]]:
        ids = p.input_ids
        labels = ids[1:] + [ids[-1]]
        # position t predicts token t + 1: answer tokens start at num_prompt
        mask = [p.num_prompt - 1 <= t < len(ids) - 1 for t in range(len(ids))]
        return labels, mask

    def _packed(self, prompts: list[Prompt]):
        ids, labels, mask, lengths = [], [], [], []
        for p in prompts:
            lab, m = self._targets(p)
            ids += p.input_ids
            labels += lab
            mask += m
            lengths.append(len(p.input_ids))
        if self.pad_to is not None:
            if len(ids) > self.pad_to:
                raise ValueError(f"packed batch of {len(ids)} tokens exceeds pad_to={self.pad_to}")
            filler = self.pad_to - len(ids)
            if filler:
                ids += [self.pad_id] * filler
                labels += [self.pad_id] * filler
                mask += [False] * filler
                lengths.append(filler)
        cu = torch.tensor([0] + lengths).cumsum(0)
        as_row = lambda x, dt: torch.tensor(x, dtype=dt)[None]  # noqa: E731
        return (as_row(ids, torch.long), as_row(labels, torch.long), as_row(mask, torch.bool), cu)

    def _padded(self, prompts: list[Prompt]):
        width = max(len(p.input_ids) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        labels = ids.clone()
        mask = torch.zeros(len(prompts), width, dtype=torch.bool)
        for i, p in enumerate(prompts):
            lab, m = self._targets(p)
            n = len(p.input_ids)
            ids[i, :n] = torch.tensor(p.input_ids)
            labels[i, :n] = torch.tensor(lab)
            mask[i, :n] = torch.tensor(m)
        return ids, labels, mask, None


@dataclass
class SkippedCuts:
    """What the loader returns for a sampled batch none of whose cuts could be decoded."""

    skipped: list[ManifestError]


class CutBatches(torch.utils.data.Dataset):
    """Map-style dataset over the sampler's CutSets, for torch's DataLoader
    (`DataLoader(CutBatches(collator, policy), sampler=sampler, batch_size=None,
    num_workers=n)`): audio decoding, features and tokenisation run in the loader's workers.

    Decoding is where a streamed manifest's audio is first read in full: a cut whose samples
    cannot be trained on (unreadable, empty, non-finite, silent) raises a `ManifestError`
    naming its manifest, line and field, or with `policy.skip_bad` is left out of its batch
    and reported in `Batch.skipped` (a `SkippedCuts` when no cut of the batch is left)."""

    def __init__(self, collator: Collator, policy: LoadPolicy | None = None):
        self.collator, self.policy = collator, policy or LoadPolicy()

    def __getitem__(self, cuts: CutSet) -> Batch | SkippedCuts:
        kept, waves, skipped = [], [], []
        for cut in cuts:
            wave, problem = None, None
            try:
                wave = cut.load_audio()[0]
                problem = sample_problem(wave, self.policy.silence_peak)
            except Exception as e:  # decoders raise several types for corrupt files
                problem = ("audio_unreadable", f"cannot decode audio: {e}")
            if problem is None:
                kept.append(cut)
                waves.append(wave)
                continue
            err = cut_error(cut, problem[1], problem[0])
            if not self.policy.skip_bad:
                raise err
            skipped.append(err)
        if not kept:
            return SkippedCuts(skipped)
        batch = self.collator.from_waves(kept, waves)
        batch.skipped = skipped
        return batch
