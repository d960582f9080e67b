#!/usr/bin/env python3
"""Synthesise the small bilingual (English + Mandarin) demo speech corpus with espeak-ng.

Texts come from Debian's fortune cookie files (package ``fortunes`` for English, ``fortunes-zh``
for Mandarin), audio from espeak-ng (converted to 16 kHz mono 16-bit FLAC with sox). The corpus is
committed under ``examples/data``; this script is only needed to regenerate it:

    sudo apt-get install espeak-ng sox fortunes fortunes-zh
    pip install pypinyin soundfile tqdm
    python tools/make_demo_data.py            # writes examples/data

Output: ``<out>/train.jsonl``, ``<out>/heldout.jsonl`` (one JSON object per line, audio paths
relative to the manifest's folder), ``<out>/audio/{train,heldout}/{en,zh}_NNNN.flac`` and
``<out>/README.md``.

Size: espeak-ng speech costs about 19 kB/s as 16 kHz 16-bit FLAC, so the defaults (300 + 60
utterances of 1.5-3.5 s, short sentences, about 14 min in all) keep the folder near 16 MB, under the
18 MB budget of the committed corpus.

Determinism: the sentence selection and every voice parameter come from ``--seed``; an utterance
whose synthesised duration falls outside [--min-dur, --max-dur] is skipped and the next candidate
of the (seeded) shuffled list is taken, so the same seed and the same espeak-ng version give the
same corpus.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

FORTUNE_GLOB = "/usr/share/games/fortunes*"
ZH_FILES = ("chinese", "tang300", "song100")  # fortunes-zh

# espeak-ng English voices (gmw/*; the mb-* ones need mbrola and are not used) and variants
# (files under espeak-ng-data/voices/!v/; an unknown variant silently falls back to the default,
# so they are checked before synthesis). "" = the voice's own default.
EN_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan")
EN_VARIANTS = ("", "m1", "m2", "m3", "m4", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
               "Andy", "Annie", "steph", "edward", "john")
# Only cmn-latn-pinyin reads Mandarin correctly (see README); it takes pinyin with tone digits.
ZH_VOICES = ("cmn-latn-pinyin",)
ZH_VARIANTS = ("", "m1", "m2", "m3", "m4", "m6", "f1", "f2", "f3", "f4", "f5", "Annie", "steph")
EN_SPEED, EN_PITCH = (130, 190), (30, 70)
ZH_SPEED, ZH_PITCH = (160, 220), (30, 70)

EN_OK = re.compile(r"^[A-Z][A-Za-z0-9 ,.'?!;:-]*[.?!]$")
EN_ABBREV = re.compile(r"\b(?:[A-Za-z]\.|Mr|Mrs|Ms|Dr|St|Jr|Sr|vs|etc|Prof|Gen|Col|Lt|Sgt|Mt|"
                       r"No|Inc|Ltd|Co|Vol|Rev|Capt|Gov|Sen|Rep)\.")
EN_BLOCK = re.compile(r"\b(?:sex\w*|kill\w*|drunk\w*|dead|death|die[sd]?|suicide|god|hell|damn\w*|"
                      r"war|gun\w*|murder\w*|drugs?|naked|nude|whores?|bitch\w*|bastards?|girls?|"
                      r"women|woman|wife|wives|hate\w*|stupid|fat|ugly)\b", re.I)
EN_SPLIT = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")
ZH_PUNCT = "，、。！？；："
ZH_OK = re.compile(r"^[\u4e00-\u9fff][\u4e00-\u9fff" + ZH_PUNCT + r"]*[。！？]$")
ZH_SPLIT = re.compile(r"(?<=[。！？；])")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# ----------------------------------------------------------------------------------- texts
def fortune_files() -> tuple[list[str], list[str]]:
    """(English fortune files, Chinese fortune files); exits with a message if either is missing."""
    dirs = [d for d in sorted(glob.glob(FORTUNE_GLOB)) if os.path.isdir(d)]
    en, zh = [], []
    for d in dirs:
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            # a fortune text file has a strfile index "<name>.dat" next to it; sub-folders (e.g.
            # the offensive "off/") are not searched
            if not os.path.isfile(path) or "." in name or not os.path.exists(path + ".dat"):
                continue
            (zh if name in ZH_FILES else en).append(path)
    missing = []
    if not en:
        missing.append("English fortune files (Debian package 'fortunes')")
    if not zh:
        missing.append("Chinese fortune files chinese/tang300/song100 (Debian package 'fortunes-zh')")
    if missing:
        sys.exit(f"error: no {' and no '.join(missing)} under {FORTUNE_GLOB}; they are needed only to "
                 "regenerate the corpus: sudo apt-get install fortunes fortunes-zh")
    return en, zh


def read_fortunes(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = ANSI.sub("", f.read())
    return [c for c in re.split(r"^%\s*$", text, flags=re.M) if c.strip()]


def english_sentences(path: str, min_words: int, max_words: int) -> list[str]:
    out = []
    for cookie in read_fortunes(path):
        lines = [ln.strip() for ln in cookie.splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("--") and not ln.startswith("- ")]
        if any(a[-1] not in ".,;:!?-" and b[:1].isupper() for a, b in zip(lines, lines[1:])):
            continue  # verse / lists: lines without punctuation would run together
        text = re.sub(r"\s+", " ", " ".join(lines)).strip()
        if not text or EN_ABBREV.search(text) or "--" in text:
            continue  # abbreviations would split sentences wrongly
        for s in EN_SPLIT.split(text):
            s = s.strip()
            if not EN_OK.match(s) or not min_words <= len(s.split()) <= max_words:
                continue
            if EN_BLOCK.search(s):
                continue  # keep the demo corpus tame
            if re.search(r"[A-Z]{2,}", s):
                continue  # acronyms / shouting: espeak spells them, transcript would not match
            if re.search(r"[,;:'-]{2,}|\s[,.;:?!]|'\s|\s'|^'|[.?!].+[.?!]$", s):
                continue  # quotes, odd punctuation, several sentences
            out.append(s)
    return out


def chinese_sentences(path: str, min_chars: int, max_chars: int) -> list[str]:
    out = []
    for cookie in read_fortunes(path):
        # lines wrap inside a paragraph (join them without spaces); blank lines end a paragraph
        for para in re.split(r"\n\s*\n", cookie):
            text = "".join(ln.strip() for ln in para.splitlines())
            text = unicodedata.normalize("NFKC", text)  # full-width ASCII -> ASCII (then rejected)
            text = text.replace(",", "，").replace("!", "！").replace("?", "？").replace(";", "；")
            text = text.replace(":", "：")
            for s in ZH_SPLIT.split(text):
                s = s.strip().lstrip("*·•- ")
                n = sum("\u4e00" <= ch <= "\u9fff" for ch in s)
                if ZH_OK.match(s) and min_chars <= n <= max_chars and common_hanzi(s):
                    out.append(s)
    return out


def common_hanzi(s: str) -> bool:
    """Only the 3755 common simplified characters (GB 2312 level 1): no traditional or rare
    characters, whose readings pypinyin and espeak-ng get wrong more often."""
    for ch in s:
        if "\u4e00" <= ch <= "\u9fff":
            try:
                b = ch.encode("gb2312")
            except UnicodeEncodeError:
                return False
            if not 0xB0 <= b[0] <= 0xD7:
                return False
    return True


def norm_key(s: str) -> str:
    return "".join(ch for ch in s.lower() if ch.isalnum())


def grams(s: str, lang: str) -> set:
    if lang == "en":
        w = norm_key_words(s)
        return {tuple(w[i:i + 3]) for i in range(max(1, len(w) - 2))}
    c = norm_key(s)
    return {c[i:i + 3] for i in range(max(1, len(c) - 2))}


def norm_key_words(s: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", s.lower()).split()


def pick_pool(sentences: list[str], lang: str, rng: random.Random) -> list[str]:
    """Deduplicated, shuffled candidates; near-duplicates (half of their 3-grams already used by an
    earlier candidate) are dropped so no sentence is a light rewording of another."""
    uniq = {}
    for s in sentences:
        uniq.setdefault(norm_key(s), s)
    pool = sorted(uniq.values())
    rng.shuffle(pool)
    seen: set = set()
    out = []
    for s in pool:
        g = grams(s, lang)
        if len(g & seen) * 2 > len(g):
            continue
        seen |= g
        out.append(s)
    return out


# ---------------------------------------------------------------------------------- pinyin
def to_pinyin(sentence: str) -> str | None:
    """Mandarin sentence -> 'ni3 hao3, shi4 jie4.' (tone digits 1-5, 5 = neutral tone);
    None if a character has no reading."""
    from pypinyin import Style, lazy_pinyin

    punct = {"，": ",", "、": ",", "；": ",", "：": ",", "。": ".", "！": "!", "？": "?"}
    parts = []
    for tok in lazy_pinyin(sentence, style=Style.TONE3, neutral_tone_with_five=True,
                           errors="default"):
        if re.fullmatch(r"[a-zü]+[1-5]", tok):
            parts.append(tok.replace("ü", "v"))
        elif all(ch in punct for ch in tok):
            for ch in tok:
                if parts:
                    parts[-1] += punct[ch]
        else:
            return None
    return " ".join(parts)


# -------------------------------------------------------------------------------- synthesis
@dataclass
class Item:
    lang: str
    split: str
    text: str
    spoken: str  # what espeak-ng is given (pinyin for Mandarin)
    voice: str
    speed: int
    pitch: int
    gap: int


def voice_params(rng: random.Random, lang: str) -> tuple[str, int, int, int]:
    if lang == "en":
        voice = rng.choice(EN_VOICES)
        var = rng.choice(EN_VARIANTS)
        speed, pitch = rng.randint(*EN_SPEED), rng.randint(*EN_PITCH)
    else:
        voice = rng.choice(ZH_VOICES)
        var = rng.choice(ZH_VARIANTS)
        speed, pitch = rng.randint(*ZH_SPEED), rng.randint(*ZH_PITCH)
    gap = rng.choice((0, 0, 1, 2))  # extra pause between words, in 10 ms units
    return (f"{voice}+{var}" if var else voice), speed, pitch, gap


def check_tools() -> None:
    for tool, pkg in (("espeak-ng", "espeak-ng"), ("sox", "sox")):
        if shutil.which(tool) is None:
            sys.exit(f"error: '{tool}' not found; sudo apt-get install {pkg}")
    ver = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"Data at:\s*(\S+)", ver)
    if m:  # a misspelt variant silently falls back to the default voice: check the files
        vdir = os.path.join(m.group(1), "voices", "!v")
        bad = [v for v in set(EN_VARIANTS + ZH_VARIANTS) if v and not os.path.exists(os.path.join(vdir, v))]
        if bad:
            sys.exit(f"error: espeak-ng variants missing in {vdir}: {sorted(bad)}")
    voices = subprocess.run(["espeak-ng", "--voices"], capture_output=True, text=True).stdout.split()
    missing = [v for v in EN_VOICES + ZH_VOICES if v not in voices]
    if missing:
        sys.exit(f"error: espeak-ng voices missing: {missing}")


def synth(item: Item, dst: str, tmpdir: str) -> float | None:
    """Synthesise item into dst (16 kHz mono 16-bit FLAC); return its duration in seconds."""
    import soundfile as sf

    wav = os.path.join(tmpdir, os.path.basename(dst) + ".wav")
    subprocess.run(["espeak-ng", "-v", item.voice, "-s", str(item.speed), "-p", str(item.pitch),
                    "-g", str(item.gap), "-w", wav, "--", item.spoken],
                   check=True, capture_output=True)
    # trim leading/trailing silence, keep 0.1 s of it on each side
    subprocess.run(["sox", "-D", wav, "-r", "16000", "-c", "1", "-b", "16", dst,
                    "silence", "1", "0.02", "-60d", "reverse", "silence", "1", "0.02", "-60d", "reverse",
                    "pad", "0.1", "0.1", "norm", "-1"], check=True, capture_output=True)
    os.remove(wav)
    info = sf.info(dst)
    return info.frames / info.samplerate


def build_split(lang: str, split: str, pool: list[str], n: int, args, out: str, tmpdir: str,
                pbar) -> list[tuple[Item, str, float]]:
    """Synthesise candidates of pool in order until n have a duration in range."""
    done: list[tuple[Item, str, float]] = []
    adir = os.path.join(out, "audio", split)
    os.makedirs(adir, exist_ok=True)
    pos = 0
    with ThreadPoolExecutor(max_workers=min(2, args.workers)) as ex:
        while len(done) < n:
            if pos >= len(pool):
                sys.exit(f"error: only {len(done)}/{n} {lang} {split} sentences fit "
                         f"{args.min_dur}-{args.max_dur} s; lower the counts or widen the limits")
            batch = []
            for text in pool[pos:pos + max(4, (n - len(done)) + 4)]:
                # parameters depend only on (seed, lang, text): stable under any batching
                h = hashlib.sha256(f"{args.seed}|{lang}|{text}".encode()).hexdigest()
                spoken = text if lang == "en" else to_pinyin(text)
                batch.append((text, spoken, random.Random(int(h[:16], 16))))
            pos += len(batch)
            jobs = []
            for i, (text, spoken, rng) in enumerate(batch):
                if spoken is None:
                    continue
                item = Item(lang, split, text, spoken, *voice_params(rng, lang))
                dst = os.path.join(adir, f"tmp_{lang}_{pos}_{i}.flac")
                jobs.append((item, dst, ex.submit(synth, item, dst, tmpdir)))
            for item, dst, fut in jobs:  # in candidate order -> deterministic
                dur = fut.result()
                if len(done) < n and args.min_dur <= dur <= args.max_dur:
                    final = os.path.join(adir, f"{lang}_{len(done) + 1:04d}.flac")
                    os.replace(dst, final)
                    done.append((item, final, dur))
                    pbar.update(1)
                else:
                    os.remove(dst)
    return done


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def write_readme(out: str, args, rows: dict, total_s: float, size: int, cmd: str) -> None:
    def count(split, lang):
        return sum(1 for it, _, _ in rows[split] if it.lang == lang)

    def dur(split, lang=None):
        return sum(d for it, _, d in rows[split] if lang is None or it.lang == lang)

    table = "\n".join(
        f"| {split} | {count(split, 'en')} | {count(split, 'zh')} | {len(rows[split])} | "
        f"{dur(split) / 60:.1f} min |" for split in ("train", "heldout"))
    voices_en = ", ".join(EN_VOICES)
    vars_en = ", ".join(v for v in EN_VARIANTS if v)
    vars_zh = ", ".join(v for v in ZH_VARIANTS if v)
    text = f"""# Demo speech corpus (English + Mandarin, synthetic)

A small bilingual speech-recognition corpus for demos, smoke tests and examples of `ark_mega`:
short English and Mandarin sentences read by the espeak-ng formant synthesiser. It is far too
small and too robotic to train a useful recogniser; it exists so that the pipeline can run end to
end without downloading anything.

| split | English | Mandarin | utterances | duration |
|---|---|---|---|---|
{table}

Total: {len(rows['train']) + len(rows['heldout'])} utterances, {total_s / 3600:.3f} h
({total_s / 60:.1f} min), {size / 1e6:.1f} MB on disk.

## Files

- `train.jsonl`, `heldout.jsonl`: one JSON object per line (UTF-8),
  `{{"audio": "audio/train/en_0001.flac", "text": "...", "task": "asr", "begin_time": -1,
  "end_time": -1, "language": "en"}}` (`language` is `en` or `zh`). **Audio paths are relative
  to the folder of the manifest.** `text` is the sentence as written and as spoken.
- `audio/{{train,heldout}}/{{en,zh}}_NNNN.flac`: 16 kHz, mono, 16-bit FLAC, {args.min_dur}-{args.max_dur} s,
  leading and trailing silence trimmed to 0.1 s, peak-normalised to -1 dBFS.

The sizes are kept small on purpose (the corpus lives in git; synthetic speech costs about
19 kB/s as FLAC), hence short sentences and durations.

Every sentence occurs once; no held-out sentence is in the training split, and near-duplicates
(sentences sharing half of their word or character 3-grams with another) were removed. Voices
overlap between the splits.

## How it was made

```
{cmd}
```

(needs `espeak-ng`, `sox`, `fortunes`, `fortunes-zh` from Debian/Ubuntu and `pypinyin`,
`soundfile`, `tqdm`; the same seed and espeak-ng version give the same corpus; this one was made
with {espeak_version()}.)

- Texts: English sentences of {args.en_words[0]}-{args.en_words[1]} words (plain ASCII) from the
  English files of Debian's `fortunes` package; Mandarin sentences of
  {args.zh_chars[0]}-{args.zh_chars[1]} characters (Chinese characters and CJK punctuation only)
  from `fortunes-zh` (`chinese`, `tang300`, `song100`). Chosen at random with seed {args.seed}.
- English voices: espeak-ng {voices_en}, each with one of the variants {vars_en} or none;
  speed {EN_SPEED[0]}-{EN_SPEED[1]} wpm, pitch {EN_PITCH[0]}-{EN_PITCH[1]}.
- Mandarin: espeak-ng `cmn-latn-pinyin` (the only espeak-ng voice that reads Mandarin correctly;
  plain `cmn`/`zh` read the tone digits of their internal pinyin as English numbers), fed the sentence
  converted to pinyin with tone digits (`pypinyin`, `Style.TONE3`, neutral tone = 5), with one of
  the variants {vars_zh} or none; speed {ZH_SPEED[0]}-{ZH_SPEED[1]}, pitch {ZH_PITCH[0]}-{ZH_PITCH[1]}.
  The pronunciation is only as good as pypinyin's readings (polyphones) and espeak-ng's Mandarin.
- Then `sox -D in.wav -r 16000 -c 1 -b 16 out.flac silence ... norm -1`.

## Licence

The texts are from Debian's fortune cookie packages: `fortunes` (fortune-mod, BSD licence; the
quotations belong to their authors) and `fortunes-zh` (GPL-3.0-or-later packaging; classical Tang
and Song poems and excerpts of Debian documentation). The audio is synthetic (espeak-ng); no
human voice is included.
"""
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


def espeak_version() -> str:
    v = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"(eSpeak NG text-to-speech: \S+)", v)
    return m.group(1) if m else "espeak-ng"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="examples/data")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train", type=int, default=300, help="training utterances (half per language)")
    ap.add_argument("--heldout", type=int, default=60, help="held-out utterances (half per language)")
    ap.add_argument("--min-dur", type=float, default=1.5)
    ap.add_argument("--max-dur", type=float, default=3.5)
    ap.add_argument("--en-words", type=int, nargs=2, default=(4, 8), metavar=("MIN", "MAX"))
    ap.add_argument("--zh-chars", type=int, nargs=2, default=(4, 9), metavar=("MIN", "MAX"))
    ap.add_argument("--workers", type=int, default=2, help="parallel synthesis jobs (at most 2)")
    args = ap.parse_args()

    from tqdm import tqdm

    en_files, zh_files = fortune_files()
    check_tools()
    try:
        import pypinyin  # noqa: F401
    except ImportError:
        sys.exit("error: pypinyin is needed for the Mandarin texts: pip install pypinyin")

    rng = random.Random(args.seed)
    en_all = [s for p in en_files for s in english_sentences(p, *args.en_words)]
    zh_all = [s for p in zh_files for s in chinese_sentences(p, *args.zh_chars)]
    pools = {"en": pick_pool(en_all, "en", rng), "zh": pick_pool(zh_all, "zh", rng)}
    print(f"candidate sentences: en {len(pools['en'])} (of {len(en_all)}), "
          f"zh {len(pools['zh'])} (of {len(zh_all)})")

    out = args.out
    for split in ("train", "heldout"):
        shutil.rmtree(os.path.join(out, "audio", split), ignore_errors=True)
        for name in (f"{split}.jsonl",):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)

    want = {"heldout": args.heldout, "train": args.train}
    rows: dict[str, list] = {"train": [], "heldout": []}
    with tempfile.TemporaryDirectory() as tmpdir, \
            tqdm(total=sum(want.values()), unit="utt", desc="synthesising") as pbar:
        for lang in ("en", "zh"):
            pool = pools[lang]
            n_held = want["heldout"] // 2 if lang == "en" else want["heldout"] - want["heldout"] // 2
            n_train = want["train"] // 2 if lang == "en" else want["train"] - want["train"] // 2
            # held-out candidates come from the front of the shuffled pool, training ones from
            # the rest: the two never share a sentence
            cut = min(len(pool) // 4, 3 * n_held)
            rows["heldout"] += build_split(lang, "heldout", pool[:cut], n_held, args, out, tmpdir, pbar)
            rows["train"] += build_split(lang, "train", pool[cut:], n_train, args, out, tmpdir, pbar)

    for split in ("train", "heldout"):
        with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for item, path, _ in rows[split]:
                rec = {"audio": os.path.relpath(path, out).replace(os.sep, "/"), "text": item.text,
                       "task": "asr", "begin_time": -1, "end_time": -1, "language": item.lang}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    held = {it.text for it, _, _ in rows["heldout"]}
    assert not held & {it.text for it, _, _ in rows["train"]}

    total_s = sum(d for split in rows for _, _, d in rows[split])
    argv = ["python", "tools/make_demo_data.py"] + [a for a in sys.argv[1:]]
    cmd = " ".join(argv)
    write_readme(out, args, rows, total_s, 0, cmd)
    size = du(out)
    write_readme(out, args, rows, total_s, size, cmd)
    size = du(out)

    print("\nsummary")
    for split in ("train", "heldout"):
        for lang in ("en", "zh"):
            r = [d for it, _, d in rows[split] if it.lang == lang]
            print(f"  {split:8s} {lang}: {len(r):4d} utterances, {sum(r) / 60:5.1f} min "
                  f"(mean {sum(r) / max(1, len(r)):.2f} s)")
    print(f"  total: {sum(len(r) for r in rows.values())} utterances, {total_s / 3600:.3f} h, "
          f"{size / 1e6:.1f} MB in {out}")
    if size > 18e6:
        print("warning: the corpus is over 18 MB; lower --train/--heldout or --max-dur", file=sys.stderr)


if __name__ == "__main__":
    main()
