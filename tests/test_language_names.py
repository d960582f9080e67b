"""Manifest languages become the names Qwen3-ASR's answers use; another language is an error."""

import pytest

from ark_mega.data import PromptBuilder, train_bpe_tokenizer
from ark_mega.data.prompts import LANGUAGE_NAMES, language_name


def test_codes_and_names_map_to_the_teachers_names():
    assert [language_name(x, "hello") for x in ("en", "zh", "fr", "yue", "fil", "EN", "Zh")] \
        == ["English", "Chinese", "French", "Cantonese", "Filipino", "English", "Chinese"]
    assert [language_name(x, "hello") for x in ("French", "french", "CANTONESE", "Persian")] \
        == ["French", "French", "Cantonese", "Persian"]
    assert len(LANGUAGE_NAMES) == len(set(LANGUAGE_NAMES.values())) == 30


def test_no_language_is_inferred_from_the_text():
    assert language_name(None, "你好世界") == language_name("", "你好世界") == "Chinese"
    assert language_name(None, "hello there") == "English"


def test_a_region_tag_names_its_language_unless_it_is_ambiguous():
    assert [language_name(x, "hello") for x in ("en-US", "zh-CN", "pt_BR", "zh-TW")] \
        == ["English", "Chinese", "Portuguese", "Chinese"]
    with pytest.raises(ValueError, match="'zh-HK' is ambiguous .*: give yue or zh"):
        language_name("zh-HK", "hello")


@pytest.mark.parametrize("language", ["xx", "Klingon", "xx-US", "farsi", 7])
def test_an_unknown_language_is_an_error_listing_the_codes(language):
    with pytest.raises(ValueError, match=f"unknown language {language!r}: give one of the codes "
                                         "zh, en, yue, ar, .*, ro or its English name"):
        language_name(language, "hello")


def test_the_teacher_is_prompted_with_the_name():
    p = PromptBuilder.teacher(train_bpe_tokenizer(["bonjour le monde"], vocab_size=300))
    answer = p.tokenizer.decode(p.answer("bonjour", "fr"), skip_special_tokens=False)
    assert answer == "language French<asr_text>bonjour<|im_end|>"
