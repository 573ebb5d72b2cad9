"""Language table: ISO 639-1 codes -> names used in the prompt, and sacrebleu settings per target.

Extend with :func:`register` (or the ``data.languages`` config key) for languages not listed.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Language:
    code: str
    name: str
    # Scripts written without spaces between words: chrF (not chrF++) and BLEU tokenize "zh"/"ja-mecab".
    spaceless: bool = False
    bleu_tokenize: str = "13a"
    # Unicode scripts its text is written in (first word of a character's Unicode name), for vocabulary trimming
    scripts: tuple[str, ...] = ("LATIN",)


_TABLE: dict[str, Language] = {}


def register(code: str, name: str, spaceless: bool = False, bleu_tokenize: str = "13a",
             scripts: tuple[str, ...] = ("LATIN",)) -> Language:
    lang = Language(code, name, spaceless, bleu_tokenize, tuple(scripts))
    _TABLE[code] = lang
    return lang


for _c, _n in [
    ("en", "English"), ("de", "German"), ("fr", "French"), ("es", "Spanish"), ("it", "Italian"),
    ("pt", "Portuguese"), ("nl", "Dutch"), ("tr", "Turkish"), ("pl", "Polish"), ("cs", "Czech"),
    ("ro", "Romanian"), ("sv", "Swedish"), ("vi", "Vietnamese"), ("id", "Indonesian"), ("et", "Estonian"),
    ("ca", "Catalan"), ("cy", "Welsh"), ("lv", "Latvian"), ("sl", "Slovenian"),
]:
    register(_c, _n)
for _c, _n, _s in [("ru", "Russian", "CYRILLIC"), ("uk", "Ukrainian", "CYRILLIC"), ("mn", "Mongolian", "CYRILLIC"),
                   ("ar", "Arabic", "ARABIC"), ("fa", "Persian", "ARABIC"), ("hi", "Hindi", "DEVANAGARI"),
                   ("ta", "Tamil", "TAMIL")]:
    register(_c, _n, scripts=(_s,))
register("zh", "Chinese", spaceless=True, bleu_tokenize="zh", scripts=("CJK",))
register("ja", "Japanese", spaceless=True, bleu_tokenize="ja-mecab", scripts=("CJK", "HIRAGANA", "KATAKANA"))
register("ko", "Korean", spaceless=False, bleu_tokenize="ko-mecab", scripts=("HANGUL", "CJK"))


class UnknownLanguage(ValueError):
    pass


def get(code: str) -> Language:
    try:
        return _TABLE[code]
    except KeyError:
        raise UnknownLanguage(
            f"unknown language code {code!r}: use an ISO 639-1 code from the language table "
            f"({', '.join(sorted(_TABLE))}) or register it with engine.langs.register(code, name)"
        ) from None


def known() -> list[str]:
    return sorted(_TABLE)
