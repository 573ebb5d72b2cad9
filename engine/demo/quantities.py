"""A learnable speech-translation task for the CPU demo: spoken quantities -> German / Chinese.

Why a generated task: the demo must show a teacher that *really translates* held-out speech, and a
model small enough to train and prune on two CPU cores cannot learn open-domain translation from a
few hundred sentences. Quantities ("thirty-two red cars") are compositional: every test phrase is
an unseen combination of a number (2..99), a colour and a noun, whose parts all occur in training,
so a small model can generalise instead of memorising. The targets are real, grammatical German and
Chinese, with the parts that make it a translation and not a transcription:

* German number words put the units first and write one word ("zweiunddreißig"); the adjective
  takes the strong plural ending ("rote"); the noun its plural ("Autos", "Bäume", "Bücher").
* Chinese uses 两 for two before a measure word, 十 forms ("二十二"), and each noun's own measure
  word (辆 for cars, 只 for animals, 本 for books, 张/把/朵/棵/座 ...), with the colour as "红色的".

All phrases are written here (no external data); the English side is spoken by eSpeak NG.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

_EN_UNITS = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_EN_TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
             "eighteen", "nineteen"]
_EN_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

_DE_UNITS = ["", "ein", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"]
_DE_TEENS = ["zehn", "elf", "zwölf", "dreizehn", "vierzehn", "fünfzehn", "sechzehn", "siebzehn",
             "achtzehn", "neunzehn"]
_DE_TENS = ["", "", "zwanzig", "dreißig", "vierzig", "fünfzig", "sechzig", "siebzig", "achtzig", "neunzig"]

_ZH_DIGITS = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"]


class Thing(NamedTuple):
    en: str          # English plural
    de: str          # German plural
    zh: str          # Chinese noun
    measure: str     # Chinese measure word


class Colour(NamedTuple):
    en: str
    de: str          # strong plural form (no article): "rote", "blaue"
    zh: str


THINGS = (
    Thing("apples", "Äpfel", "苹果", "个"),
    Thing("cats", "Katzen", "猫", "只"),
    Thing("dogs", "Hunde", "狗", "只"),
    Thing("birds", "Vögel", "鸟", "只"),
    Thing("books", "Bücher", "书", "本"),
    Thing("cars", "Autos", "汽车", "辆"),
    Thing("tables", "Tische", "桌子", "张"),
    Thing("chairs", "Stühle", "椅子", "把"),
    Thing("flowers", "Blumen", "花", "朵"),
    Thing("cups", "Tassen", "杯子", "个"),
    Thing("houses", "Häuser", "房子", "座"),
    Thing("trees", "Bäume", "树", "棵"),
)

COLOURS = (
    Colour("red", "rote", "红色的"),
    Colour("blue", "blaue", "蓝色的"),
    Colour("green", "grüne", "绿色的"),
    Colour("yellow", "gelbe", "黄色的"),
    Colour("black", "schwarze", "黑色的"),
    Colour("white", "weiße", "白色的"),
)

NUMBERS = range(2, 100)  # plural everywhere: no "one red car" / "ein rotes Auto" special case


def english_number(n: int) -> str:
    if not 0 < n < 100:
        raise ValueError(f"numbers 1..99 only, got {n}")
    if n < 10:
        return _EN_UNITS[n]
    if n < 20:
        return _EN_TEENS[n - 10]
    t, u = divmod(n, 10)
    return _EN_TENS[t] + (f"-{_EN_UNITS[u]}" if u else "")


def german_number(n: int) -> str:
    if not 0 < n < 100:
        raise ValueError(f"numbers 1..99 only, got {n}")
    if n == 1:
        return "eins"
    if n < 10:
        return _DE_UNITS[n]
    if n < 20:
        return _DE_TEENS[n - 10]
    t, u = divmod(n, 10)
    return (f"{_DE_UNITS[u]}und" if u else "") + _DE_TENS[t]


def chinese_number(n: int, *, counted: bool = True) -> str:
    """Chinese numeral; ``counted`` (before a measure word): 2 is 两, as in 两只猫."""
    if not 0 < n < 100:
        raise ValueError(f"numbers 1..99 only, got {n}")
    if n == 2 and counted:
        return "两"
    if n < 10:
        return _ZH_DIGITS[n]
    t, u = divmod(n, 10)
    return ("" if t == 1 else _ZH_DIGITS[t]) + "十" + (_ZH_DIGITS[u] if u else "")


def phrase(n: int, colour: Colour, thing: Thing) -> tuple[str, str, str]:
    """(English, German, Chinese) for one quantity."""
    en = f"{english_number(n)} {colour.en} {thing.en}"
    de = f"{german_number(n)} {colour.de} {thing.de}"
    zh = f"{chinese_number(n)}{thing.measure}{colour.zh}{thing.zh}"
    return en, de, zh


def all_phrases() -> Iterator[tuple[str, str, str]]:
    """Every (English, German, Chinese) phrase, in a fixed order (98 x 6 x 12 = 7,056)."""
    for n in NUMBERS:
        for c in COLOURS:
            for t in THINGS:
                yield phrase(n, c, t)
