"""NeMo tarred audio datasets, read as a stream: the form NeMo users keep large corpora in.

A dataset is N shards: tar files of audio (`tarred_audio_filepaths`, brace-expanded:
`audio_{0..7}.tar`) and a manifest per shard (`manifest_{0..7}.json`, NeMo JSONL whose
`audio_filepath` names a member of the shard's tar), or one manifest for a single tar. Shard i
is read by streaming its tar member by member and looking each member up in manifest i (one
shard's manifest held at a time); each cut keeps its audio bytes in memory until a data worker
decodes them. For `data.subset` records are numbered shard by shard: a shard's unreadable
manifest lines first, then its records in tar order.

Bad input follows the other formats: a bad manifest record or unreadable audio is a
`ManifestError` naming the manifest, line and field; a manifest entry with no member in its tar
is `audio_missing`, one whose members of that name are links or folders only
`audio_unreadable`; a member the manifest does not list is ignored (NeMo does the same); a
member listed several times (segments by `offset` / `duration`) gives a cut per record.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from typing import Callable, Iterator

import soundfile as sf
from lhotse import Recording
from lhotse.cut import Cut

from .manifests import (AudioChecks, LoadPolicy, ManifestError, _make_cut, _nemo_language,
                        _records, _seconds)

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """NeMo's shard patterns: `{0..7}` (zero padding kept when the bounds have it) and
    `{a,b}`, expanded left to right; `_OP_` and `_CL_` stand for `{` and `}` as in NeMo."""
    pattern = pattern.replace("_OP_", "{").replace("_CL_", "}")
    m = _RANGE.search(pattern) or _CHOICE.search(pattern)
    if m is None:
        return [pattern]
    if m.re is _RANGE:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = m.group(1).split(",")
    return [out for item in items
            for out in expand_braces(pattern[:m.start()] + item + pattern[m.end():])]


def shard_pairs(manifests: str, tars: str) -> list[tuple[str, str]]:
    """(manifest, tar) of each shard."""
    ms, ts = expand_braces(manifests), expand_braces(tars)
    if len(ms) != len(ts):
        raise ValueError(f"data.train names {len(ms)} manifest(s) and data.tarred_audio_filepaths "
                         f"{len(ts)} tar file(s): give one manifest per tar (NeMo's sharded "
                         f"manifests)")
    for path in ms + ts:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"NeMo tarred dataset: no such file {path}")
    return list(zip(ms, ts))


def iter_nemo_tarred(manifests: str, tars: str, policy: LoadPolicy,
                     keep: Callable[[int], bool] | None = None
                     ) -> Iterator[tuple[int, Cut | ManifestError]]:
    """(line, cut or error) for the records of every shard, in tar order; `keep` as in
    `iter_records`. Errors carry the manifest they come from."""
    index = 0
    for manifest, tar in shard_pairs(manifests, tars):
        checks = AudioChecks(manifest, policy)
        # member name -> its records: a member may hold several segments (offset / duration)
        entries: dict[str, list[tuple[int, dict]]] = {}
        for line, obj in _records(manifest):
            if isinstance(obj, dict) and isinstance(obj.get("audio_filepath"), str):
                entries.setdefault(obj["audio_filepath"], []).append((line, obj))
                continue
            index += 1  # a bad line is a record too: `keep` takes its share of them
            if keep is None or keep(index - 1):
                yield line, obj if isinstance(obj, ManifestError) else checks.error(
                    line, "audio_filepath", "missing or not a string", "missing_field")
        not_files = {}  # name -> what the tar holds there; a later member may be the file
        with tarfile.open(tar, "r|*") as stream:
            for member in stream:
                if not member.isfile():
                    if member.name in entries:
                        not_files[member.name] = _member_kind(member)
                    continue
                records = entries.pop(member.name, None)
                if records is None:
                    continue
                kept = []
                for n, record in enumerate(records):
                    index += 1
                    if keep is None or keep(index - 1):
                        kept.append((n, *record))
                if not kept:  # the stream skips the member's bytes unread
                    continue
                data = stream.extractfile(member).read()
                for n, line, obj in kept:
                    cut_id = f"{os.path.basename(tar)}:{member.name}" + (f":{n}" if n else "")
                    try:
                        yield line, _tarred_cut(checks, line, obj, data, cut_id)
                    except ManifestError as e:
                        yield line, e
        for name, records in entries.items():  # listed, never found in the tar as a file
            reason, kind = ((f"{name} in {tar} is {not_files[name]}, not a file",
                             "audio_unreadable") if name in not_files else
                            (f"{name} is not in {tar}", "audio_missing"))
            for line, _ in records:
                index += 1
                if keep is None or keep(index - 1):
                    yield line, checks.error(line, "audio_filepath", reason, kind)


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym() or member.islnk():
        return f"a link to {member.linkname}"
    return "a folder" if member.isdir() else "a special file"


def _tarred_cut(checks: AudioChecks, line: int, obj: dict, data: bytes, cut_id: str) -> Cut:
    text = checks.text(line, obj)
    try:
        info = sf.info(io.BytesIO(data))
    except Exception as e:  # soundfile raises several types for unreadable data
        raise checks.error(line, "audio_filepath", f"cannot read audio {cut_id}: {e}",
                           "audio_unreadable") from e
    duration = info.frames / info.samplerate
    begin = _seconds(checks, line, obj, "offset", 0.0)
    end = begin + _seconds(checks, line, obj, "duration", duration - begin) if "offset" in obj else None
    begin, end = checks.segment(line, cut_id, duration, begin, end, ("offset", "duration"),
                                "audio_filepath")
    recording = Recording.from_bytes(data, recording_id=cut_id)
    return _make_cut(recording, begin, end, text, _nemo_language(checks, line, obj),
                     checks.manifest, line, "audio_filepath")
