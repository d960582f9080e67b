"""Training data as a stream: a manifest read record by record on every pass, never held whole.

At the paper's scale (tens of millions of cuts) reading and decoding every record before the
first step takes hours and tens of GB on every rank. `ManifestStream` is what the sampler
iterates instead: each pass re-reads the manifest, keeps the `data.subset` records (decided
per record, `in_subset`), and checks what is cheap there (fields, the file exists, its header
gives the duration, and with `admit` that the cut fits a batch). Decoding the audio, the
expensive check, happens in the data workers (`CutBatches`), which skip and report a record
whose samples cannot be trained on.

`SkipLedger` counts what was skipped, by kind, each record once however many passes meet it,
and stops the run once the skipped share of the records read passes `max_skip_fraction`
(judged after `MIN_RECORDS_TO_JUDGE` records, or at the end of the first pass).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
import torch.distributed as dist
from lhotse import CutSet
from lhotse.cut import Cut

from .manifests import LoadPolicy, ManifestError, SkipReport, in_subset, iter_records
from .nemo_tarred import iter_nemo_tarred

MIN_RECORDS_TO_JUDGE = 1000


class ManifestStream:
    """The cuts of `fraction` of a manifest's records, read anew on every iteration."""

    def __init__(self, path: str, policy: LoadPolicy, fraction: float = 1.0,
                 on_skip: Callable[[ManifestError], None] | None = None,
                 tarred_audio: str | None = None,
                 admit: Callable[[Cut], ManifestError | None] | None = None):
        """`tarred_audio`: the tar files of a NeMo tarred dataset whose manifests `path` names
        (both brace-expanded, `ark_mega.data.nemo_tarred`). `admit`: a further check of each
        cut read (`batching.TokenLimit`); the error it returns counts as the record's."""
        in_subset(0, fraction)  # check the fraction now, not at the first pass
        self.path, self.fraction, self.on_skip, self.admit = path, fraction, on_skip, admit
        self.tarred_audio = tarred_audio
        self.policy = replace(policy, decode_audio=False)  # decoding is the workers' job
        self.records_read = 0  # records of the subset read by the furthest pass
        self.finished_pass = False
        self.read_errors: dict[tuple[str, int], ManifestError] = {}  # (manifest, line) -> error

    def __iter__(self):
        read = 0
        keep = lambda i: in_subset(i, self.fraction)  # noqa: E731
        records = (iter_nemo_tarred(self.path, self.tarred_audio, self.policy, keep)
                   if self.tarred_audio else iter_records(self.path, self.policy, keep))
        for line, item in records:
            read += 1
            self.records_read = max(self.records_read, read)
            if self.admit is not None and not isinstance(item, ManifestError):
                item = self.admit(item) or item
            if isinstance(item, ManifestError):
                if not self.policy.skip_bad:
                    raise item
                if (item.manifest, line) not in self.read_errors:
                    self.read_errors[(item.manifest, line)] = item
                    if self.on_skip:
                        self.on_skip(item)
                continue
            yield item
        self.finished_pass = True
        if read == len(self.read_errors):
            raise ValueError(f"{self.path}: no usable records among the {read} read "
                             f"(data.subset {self.fraction})")

    def cuts(self) -> CutSet:
        """A lazy CutSet over the stream (what lhotse's samplers take)."""
        return CutSet(self)


class SkipLedger:
    """What the run skipped: read-time errors (every rank reads the whole stream, so each rank
    sees all of them) and decode-time errors (each met by the one rank whose batch held the
    record, so they are summed over the data-parallel ranks)."""

    def __init__(self, stream: ManifestStream, group=None, device: torch.device | None = None):
        self.stream, self.group, self.device = stream, group, device or torch.device("cpu")
        self.decode_errors: dict[tuple[str, int], ManifestError] = {}  # this rank's

    def add(self, errors: list[ManifestError]) -> list[ManifestError]:
        """Record decode-time errors from a batch; returns the ones not met before."""
        new = [e for e in errors if (e.manifest, e.line) not in self.decode_errors]
        for e in new:
            self.decode_errors[(e.manifest, e.line)] = e
        return new

    def totals(self) -> tuple[int, int]:
        """(records skipped, records read) over all ranks."""
        decoded = torch.tensor([len(self.decode_errors)], dtype=torch.long, device=self.device)
        if dist.is_initialized() and self.group is not None:
            dist.all_reduce(decoded, group=self.group)
        return len(self.stream.read_errors) + int(decoded), self.stream.records_read

    def check(self, max_fraction: float) -> tuple[int, int]:
        """(skipped, read); raises once the skipped share is known to be too large."""
        skipped, read = self.totals()
        judged = read >= MIN_RECORDS_TO_JUDGE or self.stream.finished_pass
        if judged and skipped > max_fraction * read:
            raise ValueError(f"{self.stream.path}: skipped {skipped} of the {read} records read "
                             f"({100 * skipped / read:.2f}%), more than data.max_skip_fraction="
                             f"{max_fraction}\n{self.summary()}")
        return skipped, read

    def summary(self) -> str:
        """Counts by kind, with the first record of each kind (this rank's decode errors)."""
        report = SkipReport()
        for err in [*self.stream.read_errors.values(), *self.decode_errors.values()]:
            report.add(err)
        return report.by_kind()
