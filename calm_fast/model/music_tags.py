"""The music conditioner's words: tags from a music manifest row (training) and from a
free-text caption (generation), in one vocabulary so that both sides agree.

A caption is read for what the music builder (data/music.py) writes and a user types:
the key ("in D minor", "Eb major"), the tempo ("96 BPM", or the words slow / medium /
fast), the instruments ("for violin and cello") and the style ("Bach chorale", "fiddle
tune", "accompaniment"). The key is two tags, tonic and mode, so that every key shares
what the model learns about the other eleven transpositions.
"""
from __future__ import annotations

import re

NOTES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
_ENHARMONIC = {"Db": "C#", "Eb": "D#", "Gb": "F#", "Ab": "G#", "Bb": "A#", "Cb": "B", "Fb": "E",
               "E#": "F", "B#": "C"}


def parse_key(text: str) -> str | None:
    """The key a caption names ('... in A minor', 'key: Eb major', music21's 'E- major'),
    as estimate_key writes it (sharps only), or None."""
    # music21 writes flats as '-' ("E- major")
    m = re.search(r"\b([A-Ga-g])([#b]|-(?=\s))?\s*(major|minor|maj|min)\b", text)
    if not m:
        return None
    note = m.group(1).upper() + (m.group(2) or "").replace("-", "b")
    note = _ENHARMONIC.get(note, note)
    mode = "major" if m.group(3).startswith("maj") else "minor"
    return f"{note} {mode}"


INSTRUMENTS = ("piano", "harpsichord", "church organ", "nylon guitar", "violin", "viola",
               "cello", "double bass", "harp", "string ensemble", "choir", "trumpet",
               "trombone", "french horn", "oboe", "bassoon", "clarinet", "flute", "pan flute",
               "ocarina")
# style tag -> the phrases that name it in a caption (the builder's collection names first)
STYLES = {
    "bach": ("bach chorale", "bach", "chorale"), "palestrina": ("palestrina motet", "palestrina"),
    "fiddle": ("fiddle tune", "fiddle"), "irish": ("irish folk tune", "irish"),
    "folk": ("european folk song", "folk song", "folk"), "medieval": ("medieval ballata", "medieval"),
    "monteverdi": ("monteverdi madrigal", "monteverdi", "madrigal"),
    "beethoven": ("beethoven",), "mozart": ("mozart",), "haydn": ("haydn",),
    "josquin": ("josquin motet", "josquin"), "accompaniment": ("accompaniment", "groove"),
}
# the builder's collection (manifest "collection") -> style tag
COLLECTION_STYLE = {"bach": "bach", "palestrina": "palestrina", "ryansMammoth": "fiddle",
                    "oneills1850": "irish", "essenFolksong": "folk", "trecento": "medieval",
                    "monteverdi": "monteverdi", "beethoven": "beethoven", "mozart": "mozart",
                    "haydn": "haydn", "josquin": "josquin", "mma": "accompaniment"}
TEMPI = ("slow", "medium", "fast")

VOCAB: tuple[str, ...] = (
    tuple(f"tonic:{n}" for n in NOTES) + ("mode:major", "mode:minor")
    + tuple(f"tempo:{t}" for t in TEMPI)
    + tuple(f"style:{s}" for s in STYLES)
    + tuple(f"instrument:{i}" for i in INSTRUMENTS))


def tempo_word(bpm: float) -> str:
    """slow below 90 BPM, fast from 125, medium between."""
    return "slow" if bpm < 90 else "fast" if bpm >= 125 else "medium"


def key_tags(key: str | None) -> list[str]:
    k = parse_key(key) if key else None
    if k is None:
        return []
    tonic, mode = k.split()
    return [f"tonic:{tonic}", f"mode:{mode}"]


def row_tags(row: dict) -> list[str]:
    """The tags of a music manifest row (data/music.py): key, tempo, style, instruments."""
    tags = key_tags(row.get("key"))
    if isinstance(row.get("bpm"), (int, float)):
        tags.append(f"tempo:{tempo_word(row['bpm'])}")
    style = COLLECTION_STYLE.get(row.get("collection", ""))
    if style:
        tags.append(f"style:{style}")
    tags += [f"instrument:{i}" for i in row.get("instruments") or () if i in INSTRUMENTS]
    return tags


def _has(phrase: str, text: str) -> bool:
    return re.search(rf"(?<![a-z]){re.escape(phrase)}(?![a-z])", text) is not None


def caption_tags(caption: str, vocab=VOCAB) -> tuple[str, ...]:
    """The tags of ``vocab`` a caption names, in vocabulary order. Tags written out in full
    ("tonic:D", "genre:jazz") count too, so a model with another vocabulary is served."""
    text = caption.lower()
    found = {t for t in vocab if t.lower() in text}
    found.update(key_tags(caption))
    m = re.search(r"(\d+(?:\.\d+)?)\s*bpm", text)
    if m:
        found.add(f"tempo:{tempo_word(float(m.group(1)))}")
    for t in TEMPI:
        if _has(t, text):
            found.add(f"tempo:{t}")
    # longest phrases first, each removed once matched: "pan flute" is not also "flute",
    # "Irish folk tune" is not also "folk"
    phrases = [(p, f"style:{s}") for s, ps in STYLES.items() for p in ps]
    phrases += [(i, f"instrument:{i}") for i in INSTRUMENTS]
    rest = text
    for phrase, tag in sorted(phrases, key=lambda pt: len(pt[0]), reverse=True):
        if _has(phrase, rest):
            found.add(tag)
            rest = re.sub(rf"(?<![a-z]){re.escape(phrase)}(?![a-z])", " ", rest)
    # a vocabulary's bare words ("jazz" for genre:jazz) as the older tag models were asked
    words = set(re.findall(r"[a-z0-9#]+", text))
    found.update(t for t in vocab if t not in VOCAB and t.split(":")[-1].lower() in words)
    return tuple(t for t in vocab if t in found)


def required_tags(caption: str, vocab, model: str) -> tuple[str, ...]:
    """``caption_tags``, refusing a model without tags or a caption that names none (what
    the doors and batch rows say to the user)."""
    if not vocab:
        raise ValueError(f"model {model!r} has no music tags")
    tags = caption_tags(caption, vocab)
    if not tags:
        raise ValueError(f"caption {caption!r} names none of this model's tags: "
                         f"{', '.join(vocab)}")
    return tags
