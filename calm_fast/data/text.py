"""Sentences for speech synthesis from offline text: fortunes, the KJV bible, pydoc topics.

Filters keep 4..25 words made only of letters and plain punctuation (no digits or
abbreviations that TTS engines read inconsistently), deduplicate case-insensitively, and
split by sentence with a fixed seed, so a test sentence is never heard in training.
"""
from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path

from ..errors import ArgumentError
from .tools import require_tool

_CLEAN = re.compile(r"^[A-Za-z ,.'?!;:-]+$")


def clean_sentence(s: str, min_words: int = 4, max_words: int = 25) -> str | None:
    """Whitespace-normalised sentence if it passes the filters, else None."""
    s = " ".join(s.split())
    if not s or not _CLEAN.match(s) or not s[0].isalpha():
        return None
    n = len(s.split())
    if n < min_words or n > max_words:
        return None
    if re.search(r"\b[A-Z]{2,}\b", s):  # acronyms are read letter by letter or not at all
        return None
    return s


def fortune_sentences(root: str = "/usr/share/games/fortunes") -> list[str]:
    require_tool(root)
    out = []
    for path in sorted(Path(root).iterdir()):
        if path.suffix or not path.is_file():  # skip the .dat/.u8 index files
            continue
        for entry in path.read_text(errors="replace").split("\n%\n"):
            if "\n" in entry.strip():  # multi-line entries are poems, dialogues, quotes
                continue
            c = clean_sentence(entry)
            if c:
                out.append(c)
    return out


def bible_sentences() -> list[str]:
    exe = require_tool("bible")
    text = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                          check=True).stdout
    out = []
    for line in text.splitlines():
        verse = re.sub(r"^\s*\w+\s*\d+:\d+\s*", "", line)  # drop the "Gen1:1 " reference
        c = clean_sentence(verse)
        if c:
            out.append(c)
    return out


def pydoc_sentences() -> list[str]:
    from pydoc_data.topics import topics

    out = []
    for body in topics.values():
        for s in re.split(r"(?<=[.!?])\s+", body):
            c = clean_sentence(s)
            if c:
                out.append(c)
    return out


SOURCES = {"fortunes": fortune_sentences, "bible": bible_sentences, "pydoc": pydoc_sentences}


def collect(sources=("fortunes", "bible", "pydoc")) -> list[str]:
    """Deduplicated sentences from the named sources, in a stable order."""
    seen, out = set(), []
    for name in sources:
        if name not in SOURCES:
            raise ArgumentError(f"unknown text source {name!r}: sources must be some of "
                                f"{sorted(SOURCES)}, got {list(sources)}")
        for s in SOURCES[name]():
            key = s.lower()
            if key not in seen:
                seen.add(key)
                out.append(s)
    return out


def split(sentences: list[str], seed: int = 0, val: float = 0.05, test: float = 0.05):
    """Disjoint (train, val, test) lists, shuffled with ``seed``."""
    if not sentences:
        raise ValueError("no sentences to split")
    if val < 0 or test < 0 or val + test >= 1:
        raise ValueError(f"val ({val}) and test ({test}) fractions must be >= 0 and sum < 1")
    order = list(sentences)
    random.Random(seed).shuffle(order)
    n_val, n_test = round(len(order) * val), round(len(order) * test)
    return order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test]
