"""The demo task's phrase generator: correct German and Chinese number words and grammar."""
from __future__ import annotations

import pytest

from engine.demo import data as demo, quantities as q


@pytest.mark.parametrize("n,de,zh,en", [
    (2, "zwei", "两", "two"), (7, "sieben", "七", "seven"), (10, "zehn", "十", "ten"),
    (11, "elf", "十一", "eleven"), (12, "zwölf", "十二", "twelve"), (16, "sechzehn", "十六", "sixteen"),
    (17, "siebzehn", "十七", "seventeen"), (20, "zwanzig", "二十", "twenty"),
    (21, "einundzwanzig", "二十一", "twenty-one"), (30, "dreißig", "三十", "thirty"),
    (32, "zweiunddreißig", "三十二", "thirty-two"), (66, "sechsundsechzig", "六十六", "sixty-six"),
    (77, "siebenundsiebzig", "七十七", "seventy-seven"), (99, "neunundneunzig", "九十九", "ninety-nine"),
])
def test_number_words(n, de, zh, en):
    assert q.german_number(n) == de
    assert q.chinese_number(n) == zh
    assert q.english_number(n) == en


def test_two_is_er_when_not_counted_and_out_of_range_refused():
    assert q.chinese_number(2, counted=False) == "二" and q.chinese_number(22) == "二十二"
    with pytest.raises(ValueError):
        q.german_number(100)


def test_phrases_use_plural_adjectives_and_measure_words():
    en, de, zh = q.phrase(32, q.COLOURS[0], q.THINGS[5])
    assert (en, de, zh) == ("thirty-two red cars", "zweiunddreißig rote Autos", "三十二辆红色的汽车")
    en, de, zh = q.phrase(2, q.COLOURS[5], q.THINGS[1])
    assert (en, de, zh) == ("two white cats", "zwei weiße Katzen", "两只白色的猫")
    phrases = list(q.all_phrases())
    assert len(phrases) == len(set(phrases)) == 98 * 6 * 12


def test_demo_sources_are_registered_and_distinct_per_direction():
    de = list(demo.SOURCES["quantities-de"].load())
    zh = list(demo.SOURCES["quantities-zh"].load())
    assert len(de) == len(zh) == 98 * 6 * 12
    assert {p.tgt_lang for p in de} == {"de"} and {p.tgt_lang for p in zh} == {"zh"}
    assert [p.en for p in de] == [p.en for p in zh]
    spec = demo.load_spec()
    chosen = demo.select(demo.clean(de + zh, spec), spec)
    test_en = {demo.source_key(p.en) for lang in chosen for p in chosen[lang]["test"]}
    train_en = {demo.source_key(p.en) for lang in chosen for p in chosen[lang]["train"]}
    assert not test_en & train_en  # test phrases are unseen combinations
