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


_TABLE: dict[str, Language] = {}


def register(code: str, name: str, spaceless: bool = False, bleu_tokenize: str = "13a") -> Language:
    lang = Language(code, name, spaceless, bleu_tokenize)
    _TABLE[code] = lang
    return lang


for _c, _n in [
    ("en", "English"), ("de", "German"), ("fr", "French"), ("es", "Spanish"), ("it", "Italian"),
    ("pt", "Portuguese"), ("nl", "Dutch"), ("ru", "Russian"), ("ar", "Arabic"), ("fa", "Persian"),
    ("tr", "Turkish"), ("pl", "Polish"), ("cs", "Czech"), ("ro", "Romanian"), ("sv", "Swedish"),
    ("uk", "Ukrainian"), ("vi", "Vietnamese"), ("id", "Indonesian"), ("hi", "Hindi"), ("et", "Estonian"),
    ("ca", "Catalan"), ("cy", "Welsh"), ("lv", "Latvian"), ("sl", "Slovenian"), ("ta", "Tamil"),
    ("mn", "Mongolian"),
]:
    register(_c, _n)
register("zh", "Chinese", spaceless=True, bleu_tokenize="zh")
register("ja", "Japanese", spaceless=True, bleu_tokenize="ja-mecab")
register("ko", "Korean", spaceless=False, bleu_tokenize="ko-mecab")


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
