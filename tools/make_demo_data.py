"""Make the demo corpus: numbers, digit strings, clock times, dates and short commands, spoken in
English and Mandarin by espeak-ng with many voices, variants, speeds and pitches.

    python tools/make_demo_data.py --seed 1234 --count 2600 --heldout 200 --out examples/data
    python tools/make_demo_data.py --seed 7 --count 200 --heldout 200 --out /tmp/fresh \\
        --exclude examples/data/train.jsonl        # a fresh held-out set: another sample
    python tools/make_demo_data.py --seed 99 --count 2000 --heldout 0 --split unlabelled \\
        --opus-level 0.97 --out examples/data --exclude ...   # more audio for OPD (demo.yaml)

A closed vocabulary that small models can generalise over from minutes of speech: held-out
utterances are word sequences that occur nowhere in train (nor in `--exclude`'s manifests).
The output is deterministic for a seed; another seed draws a fresh sample of the same
distribution. Languages alternate. Audio: 16 kHz mono OGG/Opus, silence trimmed to 0.1 s,
peak-normalised, at libsndfile's default Opus bitrate (about 30 kbit/s here) or at
`--opus-level` (libsndfile's compression level: 0.97 gave about 18 kbit/s on the demo corpus).
Needs espeak-ng (`apt-get install espeak-ng`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SAMPLE_RATE = 16000
EN_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
             "en-gb-x-gbcwmd")
ZH_VOICES = ("cmn-latn-pinyin",)
VARIANTS = ("", "m1", "m2", "m3", "m4", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "Annie", "steph")
SPEED, PITCH = (125, 185), (25, 75)  # words per minute; 0-99

# ------------------------------------------------------------------------------ English words
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
        "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ORDINAL_ONES = ["", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
                "ninth", "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth",
                "sixteenth", "seventeenth", "eighteenth", "nineteenth"]
MONTHS_EN = ["january", "february", "march", "april", "may", "june", "july", "august",
             "september", "october", "november", "december"]
ROOMS = [("kitchen", "厨房"), ("bedroom", "卧室"), ("living room", "客厅"), ("bathroom", "浴室"),
         ("garage", "车库"), ("office", "办公室")]


def en_number(n: int) -> str:
    if n < 20:
        return ONES[n]
    return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])


def en_ordinal(n: int) -> str:
    if n < 20:
        return ORDINAL_ONES[n]
    if n % 10 == 0:
        return TENS[n // 10][:-1] + "ieth"
    return TENS[n // 10] + " " + ORDINAL_ONES[n % 10]


def en_time(h: int, m: int) -> str:
    if m == 0:
        return f"{en_number(h)} o'clock"
    return f"{en_number(h)} {'oh ' + ONES[m] if m < 10 else en_number(m)}"


# ------------------------------------------------------------------ Mandarin words and pinyin
DIGITS_ZH = "零一二三四五六七八九"
PINYIN = {"零": "ling2", "一": "yi1", "二": "er4", "三": "san1", "四": "si4", "五": "wu3",
          "六": "liu4", "七": "qi1", "八": "ba1", "九": "jiu3", "十": "shi2", "点": "dian3",
          "分": "fen1", "月": "yue4", "日": "ri4", "打": "da3", "开": "kai1", "关": "guan1",
          "闭": "bi4", "的": "de5", "灯": "deng1", "设": "she4", "定": "ding4", "钟": "zhong1",
          "计": "ji4", "时": "shi2", "器": "qi4", "电": "dian4", "话": "hua4", "给": "gei3",
          "播": "bo1", "放": "fang4", "第": "di4", "首": "shou3", "歌": "ge1", "把": "ba3",
          "音": "yin1", "量": "liang4", "调": "tiao2", "到": "dao4", "叫": "jiao4", "醒": "xing3",
          "我": "wo3", "厨": "chu2", "房": "fang2", "卧": "wo4",
          "室": "shi4", "客": "ke4", "厅": "ting1", "浴": "yu4", "车": "che1", "库": "ku4",
          "办": "ban4", "公": "gong1", "整": "zheng3"}


def zh_number(n: int) -> str:
    if n < 10:
        return DIGITS_ZH[n]
    tens, ones = divmod(n, 10)
    return ("" if tens == 1 else DIGITS_ZH[tens]) + "十" + ("" if ones == 0 else DIGITS_ZH[ones])


def zh_time(h: int, m: int) -> str:
    if m == 0:
        return f"{zh_number(h)}点整"
    return f"{zh_number(h)}点{'零' if m < 10 else ''}{zh_number(m)}分"


def pinyin(text: str) -> str:
    return " ".join(PINYIN[ch] for ch in text)


# ------------------------------------------------------------------------------- sentences
def sentence(lang: str, rng: random.Random) -> str:
    """One utterance's text: the same kinds of content in both languages."""
    kind = rng.choices(("digits", "number", "time", "date", "command"), (5, 3, 4, 3, 5))[0]
    en = lang == "en"
    if kind == "digits":
        ds = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
        return " ".join(ONES[d] for d in ds) if en else "".join(DIGITS_ZH[d] for d in ds)
    if kind == "number":
        n = rng.randrange(100)
        return en_number(n) if en else zh_number(n)
    if kind == "time":
        h, m = rng.randint(1, 12), rng.choice((0, rng.randrange(60)))
        return en_time(h, m) if en else zh_time(h, m)
    if kind == "date":
        month, day = rng.randrange(12), rng.randint(1, 28)
        return f"{MONTHS_EN[month]} {en_ordinal(day)}" if en else \
            f"{zh_number(month + 1)}月{zh_number(day)}日"
    room_en, room_zh = rng.choice(ROOMS)
    n, h, m = rng.randint(2, 60), rng.randint(1, 12), rng.choice((0, 15, 30, 45))
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 5))]
    options = [
        (f"turn on the {room_en} light", f"打开{room_zh}的灯"),
        (f"turn off the {room_en} light", f"关闭{room_zh}的灯"),
        (f"set a timer for {en_number(n)} minutes", f"设定{zh_number(n)}分钟的计时器"),
        ("call " + " ".join(ONES[d] for d in digits), "打电话给" + "".join(DIGITS_ZH[d] for d in digits)),
        (f"play track {en_number(n)}", f"播放第{zh_number(n)}首歌"),
        (f"set the volume to {en_number(n)}", f"把音量调到{zh_number(n)}"),
        (f"wake me up at {en_time(h, m)}", f"{zh_time(h, m)}叫醒我"),
    ]
    pair = rng.choice(options)
    return pair[0] if en else pair[1]


def draw_texts(seed: int, count: int, exclude: set[str]) -> list[tuple[str, str]]:
    """`count` distinct (language, text) pairs, languages alternating, none in `exclude`."""
    rng = random.Random(seed)
    seen, out, tries = set(exclude), [], 0
    while len(out) < count:
        lang = ("en", "zh")[len(out) % 2]
        text = sentence(lang, rng)
        tries += 1
        if tries > 50 * count:
            sys.exit(f"error: only {len(out)} distinct sentences found for --count {count}")
        if text not in seen:
            seen.add(text)
            out.append((lang, text))
    return out


# -------------------------------------------------------------------------------- synthesis
def render(text: str, lang: str, rng: random.Random, dst: str, tmpdir: str,
           opus_level: float | None = None) -> None:
    """Speak `text` with a random voice into dst (OGG/Opus, 16 kHz)."""
    import soundfile as sf
    from scipy.signal import resample_poly

    voice = rng.choice(EN_VOICES if lang == "en" else ZH_VOICES)
    variant = rng.choice(VARIANTS)
    speed, pitch = rng.randint(*SPEED), rng.randint(*PITCH)
    wav = os.path.join(tmpdir, os.path.basename(dst) + ".wav")
    spoken = text if lang == "en" else pinyin(text)
    subprocess.run(["espeak-ng", "-v", f"{voice}+{variant}" if variant else voice, "-s", str(speed),
                    "-p", str(pitch), "-w", wav, "--", spoken], check=True, capture_output=True)
    audio, rate = sf.read(wav, dtype="float32")
    os.remove(wav)
    audio = resample_poly(audio, SAMPLE_RATE, rate).astype(np.float32)
    loud = np.flatnonzero(np.abs(audio) > 0.01 * np.abs(audio).max())
    pad = SAMPLE_RATE // 10  # keep 0.1 s of silence on each side
    audio = audio[max(0, loud[0] - pad): loud[-1] + pad]
    audio *= 0.89 / np.abs(audio).max()  # -1 dBFS
    level = {} if opus_level is None else {"compression_level": opus_level}
    sf.write(dst, audio, SAMPLE_RATE, format="OGG", subtype="OPUS", **level)


def texts_of(manifests: list[str]) -> set[str]:
    out = set()
    for path in manifests:
        with open(path, encoding="utf-8") as f:
            out |= {json.loads(line)["text"] for line in f if line.strip()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--count", type=int, default=2600, help="utterances in all (half per language)")
    ap.add_argument("--heldout", type=int, default=200, help="of which held out (train: the rest)")
    ap.add_argument("--out", default="examples/data")
    ap.add_argument("--exclude", nargs="*", default=[], help="manifests whose texts are not drawn")
    ap.add_argument("--split", default="train",
                    help="name of the split the utterances not held out are written as")
    ap.add_argument("--opus-level", type=float, default=None,
                    help="Opus compression level 0-1 (higher: lower bitrate); default libsndfile's")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if shutil.which("espeak-ng") is None:
        sys.exit("error: espeak-ng not found; apt-get install espeak-ng")
    if args.split == "heldout":
        sys.exit("error: --split names the split that is not held out; choose another name")
    if not 0 <= args.heldout <= args.count:
        sys.exit(f"error: --heldout {args.heldout} must be within --count {args.count}")
    drawn = draw_texts(args.seed, args.count, texts_of(args.exclude))
    order = list(range(len(drawn)))
    random.Random(args.seed + 1).shuffle(order)
    held = set(order[: args.heldout])
    splits = {"heldout": [drawn[i] for i in sorted(held)],
              args.split: [drawn[i] for i in range(len(drawn)) if i not in held]}
    with tempfile.TemporaryDirectory() as tmpdir, ThreadPoolExecutor(args.workers) as pool:
        for split, items in splits.items():
            if not items:  # no empty manifest: --heldout 0 leaves a folder's held-out one as it is
                continue
            folder = os.path.join(args.out, "audio", split)
            os.makedirs(folder, exist_ok=True)
            names = [f"{split}_{i:05d}_{lang}.ogg" for i, (lang, _) in enumerate(items)]
            jobs = [pool.submit(render, text, lang, random.Random(f"{args.seed}|{split}|{i}"),
                                os.path.join(folder, name), tmpdir, args.opus_level)
                    for i, ((lang, text), name) in enumerate(zip(items, names))]
            with open(os.path.join(args.out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
                for n, ((lang, text), name, job) in enumerate(zip(items, names, jobs), 1):
                    job.result()
                    f.write(json.dumps({"audio": f"audio/{split}/{name}", "text": text,
                                        "task": "asr", "begin_time": -1, "end_time": -1,
                                        "language": lang},
                                       ensure_ascii=False) + "\n")
                    if n % 200 == 0 or n == len(items):
                        print(f"{split}: {n}/{len(items)}", flush=True)
    return 0


if __name__ == "__main__":
    from ark_mega.cli import run

    sys.exit(run(main))
