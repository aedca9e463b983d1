"""Long text -> a plan of sentence chunks and pauses, for streamed text to speech.

    plan("Hello there. [pause:1.5s] How are you?<break time=\"300ms\"/> Fine.", max_chars=200)
    -> [Say("Hello there."), Pause(1.5), Say("How are you?"), Pause(0.3), Say("Fine.")]

Pauses: ``[pause:N]`` / ``[pause:Ns]`` / ``[pause:Nms]`` and SSML ``<break time="Ns|Nms"/>``
(``<break/>`` alone: 0.5 s; ``strength="..."`` maps x-weak..x-strong to 0.1..1.2 s). Other
SSML tags (``<speak>``, ``<p>``, ``<s>``, ``<prosody>``...) are dropped, their text kept.
Text between pauses is split at sentence ends (. ! ? ; and newlines), and sentences are
packed greedily into chunks of at most ``max_chars`` characters; a sentence longer than
that is cut at the last comma or space before the limit. Whitespace is normalised.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_PAUSE_S = 10.0
_STRENGTH = {"none": 0.0, "x-weak": 0.1, "weak": 0.25, "medium": 0.5, "strong": 0.8,
             "x-strong": 1.2}
_PAUSE = re.compile(r"\[pause:\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*\]", re.I)
_BREAK = re.compile(r"<break\b([^>]*)/?>", re.I)
_TAG = re.compile(r"</?[A-Za-z][^>]*>")
_SENT = re.compile(r"(?<=[.!?;])\s+|\n+")


@dataclass(frozen=True)
class Say:
    text: str


@dataclass(frozen=True)
class Pause:
    seconds: float


def _seconds(value: str, unit: str | None, where: str) -> float:
    s = float(value) / (1000.0 if (unit or "s").lower() == "ms" else 1.0)
    if not 0 <= s <= MAX_PAUSE_S:
        raise ValueError(f"{where}: a pause of {s:g} s is outside [0, {MAX_PAUSE_S:g}] s")
    return s


def _break_seconds(attrs: str) -> float:
    m = re.search(r"time\s*=\s*[\"']\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*[\"']", attrs, re.I)
    if m:
        return _seconds(m.group(1), m.group(2), "<break>")
    m = re.search(r"strength\s*=\s*[\"']([a-z-]+)[\"']", attrs, re.I)
    if m:
        if m.group(1).lower() not in _STRENGTH:
            raise ValueError(f"<break strength={m.group(1)!r}>: use one of {list(_STRENGTH)}")
        return _STRENGTH[m.group(1).lower()]
    if re.search(r"time\s*=", attrs, re.I):
        raise ValueError(f"<break{attrs}>: time must look like \"500ms\" or \"1.5s\"")
    return 0.5


def split_sentences(text: str, max_chars: int = 300) -> list[str]:
    """Sentences of ``text`` packed greedily into chunks of at most ``max_chars``."""
    if max_chars < 8:
        raise ValueError(f"max_chars must be >= 8, got {max_chars}")
    pieces = []
    for s in _SENT.split(text):
        s = " ".join(s.split())
        while len(s) > max_chars:  # cut an over-long sentence at a comma or a space
            cut = max(s.rfind(", ", 0, max_chars), s.rfind(" ", 0, max_chars))
            cut = cut + 1 if cut > 0 else max_chars
            pieces.append(s[:cut].strip())
            s = s[cut:].strip()
        if s:
            pieces.append(s)
    chunks: list[str] = []
    for p in pieces:
        if chunks and len(chunks[-1]) + 1 + len(p) <= max_chars:
            chunks[-1] += " " + p
        else:
            chunks.append(p)
    return chunks


def plan(text: str, max_chars: int = 300) -> list[Say | Pause]:
    """The chunks and pauses of ``text`` (see the module docstring). Raises ValueError on a
    malformed pause; returns [] for text with nothing to say."""
    marks: list[tuple[int, int, float]] = []
    for m in _PAUSE.finditer(text):
        marks.append((m.start(), m.end(), _seconds(m.group(1), m.group(2), m.group(0))))
    for m in _BREAK.finditer(text):
        marks.append((m.start(), m.end(), _break_seconds(m.group(1))))
    marks.sort()
    out: list[Say | Pause] = []
    pos = 0
    for start, end, sec in marks + [(len(text), len(text), -1.0)]:
        if start < pos:
            continue
        segment = _TAG.sub(" ", text[pos:start]).replace("&amp;", "&").replace(
            "&lt;", "<").replace("&gt;", ">")
        out += [Say(c) for c in split_sentences(segment, max_chars)]
        if sec > 0:
            if out and isinstance(out[-1], Pause):
                out[-1] = Pause(min(MAX_PAUSE_S, out[-1].seconds + sec))
            else:
                out.append(Pause(sec))
        pos = end
    while out and isinstance(out[-1], Pause) and not any(isinstance(x, Say) for x in out):
        out.pop()
    return out
