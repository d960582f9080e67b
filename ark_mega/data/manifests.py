"""Manifests -> validated lhotse cuts, one supervision (the transcript) per cut.

Accepted inputs:
- the reference JSONL: `audio`, `text`, optional `task` (must be "asr"), `begin_time` /
  `end_time` (seconds, -1 = whole file), optional `language`;
- NeMo-style JSONL: `audio_filepath`, `text`, `duration`, optional `offset` (with an offset the
  segment is [offset, offset + duration], without one the whole file);
- lhotse CutSet manifests (`*.jsonl` / `*.jsonl.gz` of cuts) and lhotse Shar folders.
JSONL manifests may be gzipped (`*.gz`); every format is read record by record.

Relative audio paths are relative to the manifest's folder. Durations come from the audio files,
never from the manifest. Every record is checked (see `AudioChecks`); a bad record raises a
`ManifestError` naming the manifest, line and field, or, with `skip_bad`, is skipped and
counted by kind, and the load fails if the skipped fraction exceeds `max_skip_fraction`.
Nothing is ever replaced by other audio.

`load_manifest` reads and checks a whole manifest into memory (held-out sets, tools);
training streams its manifest instead (`ark_mega.data.stream`).
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import soundfile as sf
from lhotse import AudioSource, CutSet, Recording, SupervisionSegment
from lhotse.cut import Cut, MonoCut, MultiCut
from lhotse.serialization import deserialize_item

from .features import N_FFT, SAMPLE_RATE
from .prompts import language_name


class ManifestError(ValueError):
    """A bad manifest record: where it is, which field, what is wrong, and its kind."""

    def __init__(self, manifest: str, line: int, field_name: str, reason: str, kind: str):
        self.manifest, self.line, self.field, self.reason, self.kind = (
            manifest, line, field_name, reason, kind)
        super().__init__(f"{manifest}:{line}: field '{field_name}': {reason}")

    def __reduce__(self):  # data workers send these to the trainer
        return ManifestError, (self.manifest, self.line, self.field, self.reason, self.kind)


@dataclass
class LoadPolicy:
    skip_bad: bool = False  # skip and count bad records instead of failing on the first
    max_skip_fraction: float = 0.01  # with skip_bad: fail when more than this is skipped
    max_duration: float = 30.0  # seconds
    decode_audio: bool = True  # decode each segment (catches corrupt and silent audio)
    silence_peak: float = 1e-4  # a segment whose peak |sample| is below this is silent
    require_text: bool = True  # False for audio to transcribe: a missing text becomes ""


@dataclass
class SkipReport:
    total: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_error: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)  # every skipped record's error, in order

    def add(self, err: ManifestError) -> None:
        self.skipped[err.kind] += 1
        self.first_error.setdefault(err.kind, str(err))
        self.errors.append(err)

    @property
    def fraction(self) -> float:
        return sum(self.skipped.values()) / max(self.total, 1)

    def summary(self) -> str:
        kept = self.total - sum(self.skipped.values())
        head = (f"{kept} of {self.total} records kept, {sum(self.skipped.values())} skipped "
                f"({100 * self.fraction:.2f}%)")
        return "\n".join([head, self.by_kind()] if self.skipped else [head])

    def by_kind(self) -> str:
        """A line per kind: its count and its first record."""
        return "\n".join(f"  {kind}: {n} (first: {self.first_error[kind]})"
                         for kind, n in sorted(self.skipped.items()))


# ------------------------------------------------------------------------------ reading


def _records(path: str) -> Iterator[tuple[int, dict | ManifestError]]:
    """(line number, parsed object or the error) for each non-blank line of a JSONL file."""
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, _encoding_error(path, number, raw)
                continue
            try:  # without its newline: an error at the line's end would be "column 1" of the next
                obj = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                yield number, ManifestError(path, number, "<json>", f"malformed JSON: {e.msg} "
                                            f"at column {e.colno}", "malformed_json")
                continue
            if not isinstance(obj, dict):
                yield number, ManifestError(path, number, "<json>", "a line must be a JSON object",
                                            "malformed_json")
                continue
            yield number, obj


def _encoding_error(path: str, number: int, raw: bytes) -> ManifestError:
    """Name the field whose bytes are not UTF-8 (undecodable bytes become lone surrogates)."""
    name = "<line>"
    try:
        obj = json.loads(raw.decode("utf-8", errors="surrogateescape"))
        bad = [k for k, v in obj.items() if isinstance(v, str)
               and any("\udc80" <= ch <= "\udcff" for ch in v)]
        name = bad[0] if bad else name
    except (json.JSONDecodeError, AttributeError):
        pass
    return ManifestError(path, number, name, "not valid UTF-8", "bad_text_encoding")


def manifest_format(path: str) -> str:
    if os.path.isdir(path):
        return "lhotse_shar"
    for _, obj in _records(path):
        if isinstance(obj, ManifestError):
            continue
        if "audio_filepath" in obj:
            return "nemo"
        if "audio" in obj:
            return "reference"
        if "recording" in obj or obj.get("type") == "MonoCut":
            return "lhotse"
        break
    else:
        raise ValueError(f"{path}: no records")
    raise ValueError(f"{path}: cannot tell the manifest format from its first record (expected "
                     f"'audio' (reference JSONL), 'audio_filepath' (NeMo) or a lhotse cut)")


# ------------------------------------------------------------------------------ checks


class AudioChecks:
    """The per-record checks shared by every format."""

    def __init__(self, manifest: str, policy: LoadPolicy):
        self.manifest, self.policy = manifest, policy

    def error(self, line, name, reason, kind):
        return ManifestError(self.manifest, line, name, reason, kind)

    def text(self, line: int, obj: dict, name: str = "text") -> str:
        if not self.policy.require_text and not obj.get(name):
            return ""
        if name not in obj:
            raise self.error(line, name, "missing", "missing_field")
        value = obj[name]
        if not isinstance(value, str):
            raise self.error(line, name, f"must be a string, got {type(value).__name__}", "bad_field")
        if not value.strip():
            raise self.error(line, name, "empty transcript", "empty_text")
        return value.strip()

    def language(self, line: int, name: str, value) -> str | None:
        """The record's language, a code or a name the prompts know (None or "": inferred from
        the text); an unknown one is an error here rather than in a data worker."""
        if value is None or value == "":
            return None
        try:
            language_name(value, "")
        except ValueError as e:
            raise self.error(line, name, str(e), "bad_field") from e
        return value

    def audio_path(self, line: int, obj: dict, name: str) -> str:
        if name not in obj:
            raise self.error(line, name, "missing", "missing_field")
        value = obj[name]
        if not isinstance(value, str) or not value:
            raise self.error(line, name, "must be a non-empty path", "bad_field")
        path = value if os.path.isabs(value) else os.path.join(os.path.dirname(
            os.path.abspath(self.manifest)), value)
        if not os.path.isfile(path):
            raise self.error(line, name, f"file not found: {path}", "audio_missing")
        return path

    def probe(self, line: int, path: str, name: str):
        try:
            info = sf.info(path)
        except Exception as e:  # soundfile raises several types for unreadable files
            raise self.error(line, name, f"cannot read audio {path}: {e}", "audio_unreadable") from e
        if info.frames == 0:
            raise self.error(line, name, f"audio file has no samples: {path}", "empty_audio")
        return info

    def segment(self, line: int, path: str, duration: float, begin: float, end: float,
                names: tuple[str, str], audio_field: str) -> tuple[float, float]:
        """Validate [begin, end] (end None: to the end of the file) against the file."""
        end = duration if end is None else end
        if begin < 0 or begin >= duration:
            raise self.error(line, names[0], f"segment start {begin} s is outside the file "
                             f"({duration:.3f} s)", "segment_outside_file")
        if end <= begin:
            raise self.error(line, names[1], f"segment end {end} s is not after its start "
                             f"{begin} s", "empty_audio")
        if end > duration + 1e-3:
            raise self.error(line, names[1], f"segment end {end} s is past the end of the file "
                             f"({duration:.3f} s)", "segment_outside_file")
        end = min(end, duration)
        if end - begin < MIN_SECONDS:
            raise self.error(line, audio_field, f"segment of {1000 * (end - begin):.1f} ms is "
                             f"shorter than the features' {1000 * MIN_SECONDS:.1f} ms",
                             "too_short")
        if end - begin > self.policy.max_duration:
            raise self.error(line, audio_field, f"segment of {end - begin:.2f} s is longer than "
                             f"the maximum {self.policy.max_duration} s", "too_long")
        return begin, end

    def samples(self, line: int, path: str, rate: int, begin: float, end: float,
                audio_field: str) -> None:
        """Decode the segment: corrupt data and silence-only segments are errors."""
        if not self.policy.decode_audio:
            return
        try:
            data, _ = sf.read(path, start=int(round(begin * rate)), stop=int(round(end * rate)),
                              dtype="float32", always_2d=True)
        except Exception as e:
            raise self.error(line, audio_field, f"cannot decode audio {path}: {e}",
                             "audio_unreadable") from e
        problem = sample_problem(data, self.policy.silence_peak)
        if problem:
            raise self.error(line, audio_field, problem[1], problem[0])


# the log-mel features reflect-pad each utterance by half a window: shorter ones cannot be padded
MIN_SECONDS = (N_FFT // 2 + 1) / SAMPLE_RATE


def sample_problem(data: np.ndarray, silence_peak: float) -> tuple[str, str] | None:
    """(kind, reason) when decoded samples cannot be trained on, else None."""
    if data.size == 0:
        return "empty_audio", "segment has no samples"
    if not np.isfinite(data).all():
        return "audio_unreadable", "audio contains NaN or infinite samples"
    if np.abs(data).max() < silence_peak:
        return "silent_audio", f"segment is silent (peak below {silence_peak})"
    return None


def _seconds(checks: AudioChecks, line: int, obj: dict, name: str, default: float) -> float:
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise checks.error(line, name, f"must be a number of seconds, got {value!r}", "bad_field")
    return float(value)


def _file_recording(cut_id: str, path: str, info) -> Recording:
    """The recording of the file `path`, from its header `info` (read once)."""
    return Recording(id=cut_id, sources=[AudioSource(type="file", channels=list(
        range(info.channels)), source=path)], sampling_rate=info.samplerate,
        num_samples=info.frames, duration=info.frames / info.samplerate)


def _make_cut(recording: Recording, begin: float, end: float, text: str, language: str | None,
              manifest: str, line: int, audio_field: str = "audio") -> Cut:
    """The cut of [begin, end] of `recording`, mono at 16 kHz, its transcript the supervision
    (which remembers the record's manifest, line and audio field)."""
    cut_id = recording.id
    cut = recording.to_cut()
    if recording.num_channels > 1:
        cut = cut.to_mono(mono_downmix=True)
    cut = cut.truncate(offset=begin, duration=end - begin, preserve_id=True)
    if recording.sampling_rate != SAMPLE_RATE:
        cut = cut.resample(SAMPLE_RATE)
    cut.supervisions = [SupervisionSegment(
        id=cut_id, recording_id=cut_id, start=0.0, duration=cut.duration, text=text,
        language=language, custom={"manifest": manifest, "line": line, "field": audio_field})]
    return cut


# ------------------------------------------------------------------------------ formats


def _reference_cut(checks: AudioChecks, line: int, obj: dict, cut_id: str) -> Cut:
    path = checks.audio_path(line, obj, "audio")
    text = checks.text(line, obj)
    if obj.get("task", "asr") != "asr":
        raise checks.error(line, "task", f"must be 'asr', got {obj['task']!r}", "bad_field")
    begin = _seconds(checks, line, obj, "begin_time", -1)
    end = _seconds(checks, line, obj, "end_time", -1)
    info = checks.probe(line, path, "audio")
    duration = info.frames / info.samplerate
    begin, end = checks.segment(line, path, duration, 0.0 if begin == -1 else begin,
                                None if end == -1 else end, ("begin_time", "end_time"), "audio")
    checks.samples(line, path, info.samplerate, begin, end, "audio")
    return _make_cut(_file_recording(cut_id, path, info), begin, end, text,
                     checks.language(line, "language", obj.get("language")), checks.manifest, line)


def _nemo_cut(checks: AudioChecks, line: int, obj: dict, cut_id: str) -> Cut:
    path = checks.audio_path(line, obj, "audio_filepath")
    text = checks.text(line, obj)
    info = checks.probe(line, path, "audio_filepath")
    duration = info.frames / info.samplerate
    if "offset" in obj:
        begin = _seconds(checks, line, obj, "offset", 0.0)
        length = _seconds(checks, line, obj, "duration", 0.0)
        begin, end = checks.segment(line, path, duration, begin, begin + length,
                                    ("offset", "duration"), "audio_filepath")
    else:  # the whole file; a stated duration is not trusted
        begin, end = checks.segment(line, path, duration, 0.0, None, ("offset", "duration"),
                                    "audio_filepath")
    checks.samples(line, path, info.samplerate, begin, end, "audio_filepath")
    return _make_cut(_file_recording(cut_id, path, info), begin, end, text,
                     _nemo_language(checks, line, obj), checks.manifest, line, "audio_filepath")


def _nemo_language(checks: AudioChecks, line: int, obj: dict) -> str | None:
    """NeMo manifests name the language `lang` (or `language`)."""
    name = "lang" if obj.get("lang") else "language"
    return checks.language(line, name, obj.get(name))


def _lhotse_cut(checks: AudioChecks, line: int, cut: Cut) -> Cut:
    sups = [s for s in cut.supervisions if s.text and s.text.strip()]
    if not cut.supervisions:
        raise checks.error(line, "supervisions", "cut has no supervision", "missing_field")
    if not sups:
        raise checks.error(line, "supervisions.text", "empty transcript", "empty_text")
    if cut.duration <= 0:
        raise checks.error(line, "duration", "cut has no duration", "empty_audio")
    if cut.duration < MIN_SECONDS:
        raise checks.error(line, "duration", f"cut of {1000 * cut.duration:.1f} ms is shorter "
                           f"than the features' {1000 * MIN_SECONDS:.1f} ms", "too_short")
    if cut.duration > checks.policy.max_duration:
        raise checks.error(line, "duration", f"cut of {cut.duration:.2f} s is longer than the "
                           f"maximum {checks.policy.max_duration} s", "too_long")
    if checks.policy.decode_audio:
        try:
            audio = cut.load_audio()
        except Exception as e:
            raise checks.error(line, "recording", f"cannot decode audio: {e}",
                               "audio_unreadable") from e
        problem = sample_problem(audio, checks.policy.silence_peak)
        if problem:
            raise checks.error(line, "recording", problem[1], problem[0])
    try:  # a downmix decodes the audio now (lhotse)
        if cut.num_channels and cut.num_channels > 1:
            cut = cut.to_mono(mono_downmix=True)
        if cut.sampling_rate != SAMPLE_RATE:
            cut = cut.resample(SAMPLE_RATE)
    except Exception as e:  # decoders raise several types for corrupt files
        raise checks.error(line, "recording", f"cannot decode audio: {e}",
                           "audio_unreadable") from e
    text = " ".join(s.text.strip() for s in sups)
    language = checks.language(line, "supervisions.language", sups[0].language)
    cut.supervisions = [SupervisionSegment(
        id=cut.id, recording_id=cut.recording_id, start=0.0, duration=cut.duration, text=text,
        language=language, custom={"manifest": checks.manifest, "line": line,
                                    "field": "recording"})]
    return cut


def audio_files(paths: list[str], policy: LoadPolicy | None = None) -> tuple[CutSet, SkipReport]:
    """Cuts of whole audio files (no transcript), checked like manifest records (the
    command line's n-th file is its "line" n): (cuts, what was skipped)."""
    policy = policy or LoadPolicy()
    checks = AudioChecks("<command line>", policy)

    def records():
        for index, path in enumerate(paths, start=1):
            try:
                obj = {"audio": os.path.abspath(path), "text": ""}
                full = checks.audio_path(index, obj, "audio")
                info = checks.probe(index, full, "audio")
                begin, end = checks.segment(index, full, info.frames / info.samplerate, 0.0, None,
                                            ("begin_time", "end_time"), "audio")
                checks.samples(index, full, info.samplerate, begin, end, "audio")
                recording = _file_recording(f"{os.path.basename(path)}:{index}", full, info)
                yield index, _make_cut(recording, begin, end, "", None, "<command line>", index)
            except ManifestError as e:
                yield index, e

    return _collect(records(), policy, "<command line>")


def iter_records(path: str, policy: LoadPolicy, keep: Callable[[int], bool] | None = None
                 ) -> Iterator[tuple[int, Cut | ManifestError]]:
    """(line, cut or error) for every record of the manifest, in order, or for the records
    whose 0-based index `keep` accepts (the others are not checked). A Shar folder's "line" is
    its cut's number."""
    fmt = manifest_format(path)
    checks = AudioChecks(path, policy)
    if fmt == "lhotse_shar":
        records = enumerate(CutSet.from_shar(in_dir=path), start=1)
    else:
        records = _records(path)
    stem = os.path.basename(path.rstrip("/"))
    first_line: dict[str, int] = {}  # a lhotse cut id -> the line that first used it
    for index, (line, obj) in enumerate(records):
        if keep is not None and not keep(index):
            continue
        if isinstance(obj, ManifestError):
            yield line, obj
            continue
        try:
            if fmt == "reference":
                yield line, _reference_cut(checks, line, obj, f"{stem}:{line}")
            elif fmt == "nemo":
                yield line, _nemo_cut(checks, line, obj, f"{stem}:{line}")
            else:
                cut = obj if fmt == "lhotse_shar" else _parse_cut(checks, line, obj)
                _check_unique(checks, line, cut.id, first_line)
                yield line, _lhotse_cut(checks, line, cut)
        except ManifestError as e:
            yield line, e


def _parse_cut(checks: AudioChecks, line: int, obj: dict) -> Cut:
    obj = dict(obj)  # lhotse pops "type"; a cut with a recording and no type is a MonoCut
    if "recording" in obj:
        obj.setdefault("type", "MonoCut")
    try:
        cut = deserialize_item(obj)
    except Exception as e:  # lhotse raises several types for records it cannot read
        raise checks.error(line, "<cut>", f"not a lhotse cut: {type(e).__name__}: {e}",
                           "bad_field") from e
    if not isinstance(cut, (MonoCut, MultiCut)):  # a MixedCut has no one recording to check
        raise checks.error(line, "type", f"a {type(cut).__name__}; give MonoCut or MultiCut "
                           f"records", "bad_field")
    return cut


def _check_unique(checks: AudioChecks, line: int, cut_id: str, first_line: dict[str, int]):
    """Cut ids key token counts and teacher transcripts: a repeated id would mix two records."""
    first = first_line.setdefault(cut_id, line)
    if first != line:
        raise checks.error(line, "id", f"cut id {cut_id!r} repeats the id of line {first}",
                           "duplicate_id")


def load_manifest(path: str, policy: LoadPolicy | None = None,
                  progress: bool = False) -> tuple[CutSet, SkipReport]:
    """Read and check a whole manifest into memory: (cuts, what was skipped)."""
    policy = policy or LoadPolicy()
    records = iter_records(path, policy)
    if progress:
        from tqdm import tqdm

        records = tqdm(records, desc=f"checking {os.path.basename(path)}", unit=" records")
    return _collect(records, policy, path)


def _collect(records, policy: LoadPolicy, path: str) -> tuple[CutSet, SkipReport]:
    """The cuts of (line, cut or error) records; errors raise, or with `skip_bad` are counted
    up to `max_skip_fraction`."""
    report, cuts = SkipReport(), []
    for _, item in records:
        report.total += 1
        if isinstance(item, ManifestError):
            if not policy.skip_bad:
                raise item
            report.add(item)
        else:
            cuts.append(item)
    if policy.skip_bad and report.fraction > policy.max_skip_fraction:
        raise ValueError(f"{path}: skipped {100 * report.fraction:.2f}% of the records, more "
                         f"than max_skip_fraction={policy.max_skip_fraction}:\n{report.summary()}")
    if not cuts:
        raise ValueError(f"{path}: no usable records\n{report.summary()}")
    return CutSet.from_cuts(cuts), report


def in_subset(index: int, fraction: float) -> bool:
    """Whether record `index` (0-based) belongs to the `fraction` subset: one record in every
    1/fraction, evenly spread over the manifest in its order (a manifest sorted by language or
    length keeps its mix), decided record by record without knowing the manifest's length."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"subset must be in (0, 1], got {fraction}")
    return int((index + 1) * fraction) > int(index * fraction)
