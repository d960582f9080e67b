"""Chat prompts with audio placeholders, tokenised, for the student and the teacher.

A prompt is `prefix + audio_token * n + suffix`, then the answer and the stop token. `n` is the
number of audio embeddings the model's encoder makes of the utterance's mel frames, so the
placeholders line up exactly with what `AudioLM.embed` splices in. Tokenizers are loaded from
local `tokenizer.json` files (`tokenizers` library); their special tokens must include the
template's.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

from tokenizers import Tokenizer


@dataclass(frozen=True)
class ChatTemplate:
    prefix: str  # before the audio placeholders
    audio_token: str  # one per audio embedding
    suffix: str  # between the audio and the answer
    answer: str  # the assistant's answer; "{text}" and "{language}" are filled in
    stop: str = "<|im_end|>"


# Ark-ASR (Qwen2 chat format; its audio tokens are added on top of the Qwen tokenizer).
ARK_ASR = ChatTemplate(
    prefix="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
           "<|begin_of_audio|>",
    audio_token="<|audio|>",
    suffix="<|end_of_audio|>Transcribe the audio.<|im_end|>\n<|im_start|>assistant\n",
    answer="{text}",
)

# Qwen3-ASR: the answer names the language, then the transcript.
QWEN3_ASR = ChatTemplate(
    prefix="<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|audio_start|>",
    audio_token="<|audio_pad|>",
    suffix="<|audio_end|><|im_end|>\n<|im_start|>assistant\n",
    answer="language {language}<asr_text>{text}",
)

ARK_SPECIAL_TOKENS = ("<|audio|>", "<|begin_of_audio|>", "<|end_of_audio|>")
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN3_ASR_SPECIAL_TOKENS = ("<|audio_start|>", "<|audio_end|>", "<|audio_pad|>", "<asr_text>")


# The languages Qwen3-ASR transcribes, by code, named as its answers name them.
LANGUAGE_NAMES = {
    "zh": "Chinese", "en": "English", "yue": "Cantonese", "ar": "Arabic", "de": "German",
    "fr": "French", "es": "Spanish", "pt": "Portuguese", "id": "Indonesian", "it": "Italian",
    "ko": "Korean", "ru": "Russian", "th": "Thai", "vi": "Vietnamese", "ja": "Japanese",
    "tr": "Turkish", "hi": "Hindi", "ms": "Malay", "nl": "Dutch", "sv": "Swedish",
    "da": "Danish", "fi": "Finnish", "pl": "Polish", "cs": "Czech", "fil": "Filipino",
    "fa": "Persian", "el": "Greek", "hu": "Hungarian", "mk": "Macedonian", "ro": "Romanian",
}
_NAMES_BY_KEY = {**{name.lower(): name for name in LANGUAGE_NAMES.values()}, **LANGUAGE_NAMES}


def language_name(language: str | None, text: str) -> str:
    """An utterance's language as the prompts name it: its manifest `language`, a code of
    LANGUAGE_NAMES (also with a region: en-US) or one of its names (any case), else, when
    empty, inferred from its text.
    Raises ValueError for any other language: Qwen3-ASR names no other."""
    if not language:
        return infer_language(text)
    key = str(language).lower().replace("_", "-")
    primary, _, region = key.partition("-")  # a region tag (en-US, pt_BR) names its language
    if primary == "zh" and region in ("hk", "mo"):
        raise ValueError(f"language {language!r} is ambiguous (Cantonese or Mandarin): give "
                         f"yue or zh")
    name = _NAMES_BY_KEY.get(key) or _NAMES_BY_KEY.get(primary)
    if name is None:
        raise ValueError(f"unknown language {language!r}: give one of the codes "
                         f"{', '.join(LANGUAGE_NAMES)} or its English name")
    return name


def infer_language(text: str) -> str:
    """"Chinese" when there are at least as many CJK ideographs as Latin words (an ideograph
    is about a word), else "English"."""
    cjk = sum(1 for ch in text if "CJK UNIFIED" in unicodedata.name(ch, ""))
    latin_words = len(re.findall(r"[A-Za-z]+", text))
    return "Chinese" if cjk and cjk >= latin_words else "English"


@dataclass
class Prompt:
    input_ids: list[int]  # prompt, then answer and stop token when a text was given
    num_prompt: int  # tokens before the answer
    num_audio: int  # audio placeholders


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate,
                 audio_tokens: Callable[[int], int]):
        self.tokenizer, self.template, self.audio_tokens = tokenizer, template, audio_tokens
        self.audio_id = self._special(template.audio_token)
        self.stop_id = self._special(template.stop)
        self.prefix = self.encode(template.prefix)
        self.suffix = self.encode(template.suffix)

    @classmethod
    def student(cls, tokenizer: Tokenizer) -> "PromptBuilder":
        """Ark-ASR's prompts, at its encoder's default settings."""
        return cls.of_family(tokenizer, "ark_asr")

    @classmethod
    def teacher(cls, tokenizer: Tokenizer) -> "PromptBuilder":
        """Qwen3-ASR's prompts, at its encoder's default settings."""
        return cls.of_family(tokenizer, "qwen3_asr")

    @classmethod
    def for_model(cls, tokenizer: Tokenizer, cfg) -> "PromptBuilder":
        """The prompts of a model config (an AudioLMConfig), at its encoder's settings."""
        return cls.of_family(tokenizer, cfg.family, cfg.encoder)

    @classmethod
    def of_family(cls, tokenizer: Tokenizer, name: str, encoder=None) -> "PromptBuilder":
        """Model family `name`'s chat template and audio-token rule (models/families.py), the
        rule read with `encoder`, an encoder config (default: the family's defaults)."""
        from ..models.families import family  # families imports this module

        fam = family(name)
        encoder = encoder if encoder is not None else fam.encoder_config()
        return cls(tokenizer, fam.template, lambda frames: fam.audio_tokens(encoder, frames))

    @property
    def answer_special_ids(self) -> list[int]:
        """Special tokens the model itself writes in its answer (Qwen3-ASR's `<asr_text>`)."""
        specials = [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
        return [self.tokenizer.token_to_id(t) for t in specials if t in self.template.answer]

    def _special(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no token {token!r}, which the chat template needs")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def answer_prefix(self, language: str) -> list[int]:
        """The answer's tokens before the transcript (Qwen3-ASR: `language X<asr_text>`)."""
        return self.encode(self.template.answer.format(text="", language=language))

    def answer(self, text: str, language: str | None = None) -> list[int]:
        """Answer tokens for `text`, stop token included. `language` may be a manifest code
        ("en", "fr") or a name (`language_name`); without it it is inferred from the text."""
        prefix = self.answer_prefix(language_name(language, text))
        return prefix + self.encode(text) + [self.stop_id]

    def build(self, mel_frames: int, text: str | None = None,
              language: str | None = None) -> Prompt:
        n = self.audio_tokens(mel_frames)
        ids = self.prefix + [self.audio_id] * n + self.suffix
        num_prompt = len(ids)
        if text is not None:
            ids = ids + self.answer(text, language)
        return Prompt(ids, num_prompt, n)
