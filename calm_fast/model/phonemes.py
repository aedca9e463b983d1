"""English text -> phoneme tokens, offline: the CMU Pronouncing Dictionary (shipped in
``calm_fast/assets/cmudict.txt.gz``, BSD licence beside it) with rules for what it lacks.

Why phonemes: the speech models here train on a few hours of audio on a laptop CPU. From
bytes, a small LM must learn English spelling-to-sound from those hours as well as the
alignment; from dictionary phonemes it learns only the alignment and the voice, which is
what makes it intelligible at this budget.

A text becomes, per word, its ARPAbet phones with stress (``AH0``, ``EY1``), words separated
by a boundary token and punctuation kept as its own tokens (pauses and prosody). Words the
dictionary lacks are tried as an inflection of a known word (KJV ``-eth``/``-est``,
``-s``, ``-ed``, ``-ing``, possessive ``'s``) and otherwise spelled as letters, which are
tokens too. Numbers are read out as words.
"""
from __future__ import annotations

import gzip
import re
from functools import lru_cache
from pathlib import Path

_LEXICON = Path(__file__).resolve().parent.parent / "assets" / "cmudict.txt.gz"

_VOWELS = ["AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH",
           "UW"]
_CONSONANTS = ["B", "CH", "D", "DH", "F", "G", "HH", "JH", "K", "L", "M", "N", "NG", "P", "R",
               "S", "SH", "T", "TH", "V", "W", "Y", "Z", "ZH"]
_PUNCT = [".", ",", "?", "!", ";", ":", "-", '"', "(", ")"]
_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
# id 0 is the word boundary; the order is part of every trained model: append only.
SYMBOLS = ([" "] + _PUNCT + [v + s for v in _VOWELS for s in "012"] + _CONSONANTS
           + [f"<{c}>" for c in _LETTERS])
_ID = {s: i for i, s in enumerate(SYMBOLS)}

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0 <= n < 10**12 as English words; larger numbers digit by digit."""
    if n >= 10 ** 12:
        return " ".join(_ONES[int(d)] for d in str(n))
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    for size, name in ((10 ** 9, "billion"), (10 ** 6, "million"), (1000, "thousand")):
        if n >= size:
            rest = n % size
            return (number_words(n // size) + " " + name
                    + ("" if rest == 0 else " " + number_words(rest)))
    raise AssertionError(n)


@lru_cache(maxsize=1)
def lexicon() -> dict[str, tuple[str, ...]]:
    with gzip.open(_LEXICON, "rt", encoding="utf-8") as f:
        return {w: tuple(p.split()) for w, p in (line.rstrip("\n").split("\t", 1) for line in f)}


_SUFFIXES = [  # (suffix, phones, candidate stems of the word without the suffix)
    ("eth", ("AH0", "TH"), lambda s: [s, s + "e", s[:-1] if len(s) > 2 and s[-1] == s[-2] else None]),
    ("est", ("AH0", "S", "T"), lambda s: [s, s + "e", s[:-1] if len(s) > 2 and s[-1] == s[-2] else None]),
    ("'s", ("Z",), lambda s: [s]),
    ("s", ("Z",), lambda s: [s]),
    ("es", ("AH0", "Z"), lambda s: [s]),
    ("ed", ("D",), lambda s: [s, s + "e", s[:-1] if len(s) > 2 and s[-1] == s[-2] else None]),
    ("ing", ("IH0", "NG"), lambda s: [s, s + "e", s[:-1] if len(s) > 2 and s[-1] == s[-2] else None]),
    ("ly", ("L", "IY0"), lambda s: [s]),
]


def word_phones(word: str) -> list[str]:
    """Symbols of one lower-case word: dictionary phones, an inflected known word, or
    its letters."""
    lex = lexicon()
    if word in lex:
        return list(lex[word])
    for suffix, tail, stems in _SUFFIXES:
        if word.endswith(suffix) and len(word) > len(suffix) + 1:
            for stem in stems(word[:-len(suffix)]):
                if stem and stem in lex:
                    return list(lex[stem]) + list(tail)
    return [f"<{c}>" for c in word if "a" <= c <= "z"]


_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)*|\d+|[.,?!;:\-\"()]")


def normalize(text: str) -> list[str]:
    """Lower-case words, read-out numbers and kept punctuation, in order."""
    text = text.lower().replace("\u2019", "'").replace("\u2014", " - ").replace("\u2013", " - ")
    out = []
    for t in _TOKEN.findall(text):
        out.extend(number_words(int(t)).split() if t.isdigit() else [t])
    return out


class PhonemeTokenizer:
    """Text -> ids of ``SYMBOLS`` (see the module docstring); ``decode`` gives the symbols
    back, space separated, words split by ``|``."""

    vocab_size = len(SYMBOLS)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for w in normalize(text):
            if w in _ID and not w[0].isalpha():  # punctuation
                ids.append(_ID[w])
                continue
            if ids and ids[-1] != 0:
                ids.append(0)
            ids.extend(_ID[s] for s in word_phones(w))
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join("|" if i == 0 else SYMBOLS[i] for i in ids)
