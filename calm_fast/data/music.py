"""Offline music with captions: scores shipped inside the music21 wheel, rendered with
fluidsynth and a General MIDI soundfont (Debian's fluid-soundfont-gm).

Each render picks, from the seed, a work, a transposition (-5..+5 semitones), a tempo and a
General MIDI instrument for every part (one shared instrument or one per part), renders
24 kHz audio, and cuts one segment. The caption says what was rendered, in words a
text-to-music model can learn: composer/collection, ensemble, instruments, tempo, key, meter.
Works are split into train/test by work, never by segment.
"""
from __future__ import annotations

import os
import random
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from calm_fast import checks

from .tools import MissingToolError, require_tool, run_jobs, write_flac, write_manifest

SAMPLE_RATE = 24_000
SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"

# General MIDI programs (0-based) by family, with the words used in captions.
INSTRUMENTS = {
    0: "piano", 6: "harpsichord", 19: "church organ", 24: "nylon guitar", 40: "violin",
    41: "viola", 42: "cello", 43: "double bass", 46: "harp", 48: "string ensemble",
    52: "choir", 56: "trumpet", 57: "trombone", 60: "french horn", 68: "oboe", 70: "bassoon",
    71: "clarinet", 73: "flute", 75: "pan flute", 79: "ocarina",
}
COLLECTIONS = {
    "bach": "Bach chorale", "palestrina": "Palestrina motet", "ryansMammoth": "fiddle tune",
    "oneills1850": "Irish folk tune", "essenFolksong": "European folk song",
    "trecento": "medieval ballata", "monteverdi": "Monteverdi madrigal",
    "beethoven": "Beethoven", "mozart": "Mozart", "haydn": "Haydn", "josquin": "Josquin motet",
}


def _music21():
    try:
        import music21
    except ImportError:
        raise MissingToolError("the music builder needs music21: pip install "
                               "'calm_fast[data]' (its corpus ships inside the wheel)") from None
    return music21


def list_works(collections=tuple(COLLECTIONS)) -> list[str]:
    """Corpus paths (relative to the music21 corpus) of the chosen collections, sorted."""
    m21 = _music21()
    out = []
    for p in m21.corpus.getCorePaths():
        rel = str(p).split("/corpus/", 1)[1]
        if rel.split("/")[0] in collections and p.suffix in (".mxl", ".krn", ".abc", ".xml"):
            out.append(rel)
    return sorted(out)


def split_works(works: list[str], seed: int = 0, test: float = 0.1):
    order = list(works)
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test * len(order))) if len(order) > 1 else 0
    return order[n_test:], order[:n_test]


def render_midi(midi_path: str, wav_path: str) -> None:
    exe = require_tool("fluidsynth")
    sf2 = require_tool(SOUNDFONT)
    res = subprocess.run([exe, "-ni", "-g", "0.5", "-r", str(SAMPLE_RATE), "-F", wav_path,
                          sf2, midi_path], capture_output=True, text=True, timeout=600)
    if res.returncode != 0 or not os.path.exists(wav_path):
        raise RuntimeError(f"fluidsynth failed: {res.stderr.strip()[:300]}")


def render_work(rel_path: str, rng: random.Random, max_seconds: float = 30.0):
    """Parse, vary and render one work. Returns (mono float32 audio at 24 kHz, metadata)."""
    m21 = _music21()
    score = m21.corpus.parse(rel_path)
    if isinstance(score, m21.stream.Opus):  # abc collections hold many tunes
        score = score.scores[rng.randrange(len(score.scores))]
    semis = rng.randint(-5, 5)
    if semis:
        score = score.transpose(semis)
    key = score.analyze("key")
    ts = score.recurse().getElementsByClass(m21.meter.TimeSignature).first()
    # Tempo and instruments are set on the MIDI events, not in the score tree: editing
    # music21 streams in place breaks on some corpus files (shared TimeSignature objects).
    mf = m21.midi.translate.streamToMidiFile(score)
    bpm = rng.randint(60, 160)
    note_tracks = [t for t in mf.tracks if any(e.isNoteOn() for e in t.events)]
    shared = rng.random() < 0.5
    programs = [rng.choice(list(INSTRUMENTS))] * len(note_tracks) if shared else \
        [rng.choice(list(INSTRUMENTS)) for _ in note_tracks]
    for track in mf.tracks:
        for ev in track.events:
            if ev.type == m21.midi.MetaEvents.SET_TEMPO:
                ev.data = (60_000_000 // bpm).to_bytes(3, "big")
    for track, prog in zip(note_tracks, programs):
        for ev in track.events:
            if ev.type == m21.midi.ChannelVoiceMessages.PROGRAM_CHANGE:
                ev.data = prog
    with tempfile.TemporaryDirectory() as tmp:
        mid, wav_path = os.path.join(tmp, "w.mid"), os.path.join(tmp, "w.wav")
        mf.open(mid, "wb")
        mf.write()
        mf.close()
        render_midi(mid, wav_path)
        wav, sr = sf.read(wav_path, dtype="float32")
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    if sr != SAMPLE_RATE:
        raise RuntimeError(f"fluidsynth wrote {sr} Hz, expected {SAMPLE_RATE}")
    wav = _segment(wav, rng, max_seconds)
    names = sorted({INSTRUMENTS[p] for p in programs})
    meta = {
        "work": rel_path, "collection": rel_path.split("/")[0], "transpose": semis,
        "bpm": bpm, "key": f"{key.tonic.name.replace('-', 'b')} {key.mode}",  # music21: E- = Eb
        "meter": ts.ratioString if ts is not None else "unknown", "instruments": names,
        "n_parts": len(note_tracks),
    }
    meta["caption"] = caption(meta)
    return wav, meta


# -- MMA accompaniment styles -------------------------------------------------------------------
MMA_LIB = "/usr/share/mma/lib/stdlib"
NOTE_NAMES = ["C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
# Roman-numeral progressions as (semitones above the tonic, chord quality) per bar.
PROGRESSIONS = {
    "I-vi-ii-V": [(0, ""), (9, "m"), (2, "m"), (7, "7")],
    "I-IV-V-I": [(0, ""), (5, ""), (7, "7"), (0, "")],
    "ii-V-I": [(2, "m7"), (7, "7"), (0, "maj7"), (0, "maj7")],
    "12-bar blues": [(0, "7")] * 4 + [(5, "7")] * 2 + [(0, "7")] * 2 + [(7, "7"), (5, "7"),
                                                                       (0, "7"), (7, "7")],
}


def list_grooves(lib: str = MMA_LIB) -> list[tuple[str, str]]:
    """(groove name, style file stem) for the first groove of each MMA style file."""
    require_tool("mma")
    out = []
    for path in sorted(Path(lib).glob("*.mma")):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("DefGroove"):
                out.append((line.split()[1], path.stem))
                break
    if not out:
        raise MissingToolError(f"no MMA styles under {lib}: reinstall the Debian package 'mma'")
    return out


def render_mma(rng: random.Random, max_seconds: float = 30.0):
    """An accompaniment in a random MMA groove, key, tempo and progression."""
    exe = require_tool("mma")
    groove, style = rng.choice(list_grooves())
    tonic = rng.randrange(12)
    prog_name = rng.choice(sorted(PROGRESSIONS))
    prog = PROGRESSIONS[prog_name]
    bpm = rng.randint(70, 160)
    bars = prog * max(1, -(-16 // len(prog)))  # at least 16 bars
    lines = [f"Tempo {bpm}", f"Groove {groove}"]
    lines += [f"{i + 1} {NOTE_NAMES[(tonic + st) % 12]}{q}" for i, (st, q) in enumerate(bars)]
    with tempfile.TemporaryDirectory() as tmp:
        src, mid, wav_path = (os.path.join(tmp, n) for n in ("s.mma", "s.mid", "s.wav"))
        Path(src).write_text("\n".join(lines) + "\n")
        res = subprocess.run([exe, src, "-f", mid], capture_output=True, text=True,
                             timeout=120, cwd=tmp)
        if res.returncode != 0 or not os.path.exists(mid):
            raise RuntimeError(f"mma failed for groove {groove}: {res.stdout[-300:]}")
        render_midi(mid, wav_path)
        wav, sr = sf.read(wav_path, dtype="float32")
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    wav = _segment(wav, rng, max_seconds)
    meta = {"work": f"mma:{style}", "collection": "mma", "style": style, "groove": groove,
            "bpm": bpm, "key": f"{NOTE_NAMES[tonic]} major", "progression": prog_name,
            "transpose": 0, "instruments": [], "n_parts": 0, "meter": "unknown"}
    meta["caption"] = (f"{style} accompaniment in {NOTE_NAMES[tonic]} major, {bpm} BPM, "
                       f"{prog_name} progression")
    return wav, meta


def _segment(wav: np.ndarray, rng: random.Random, max_seconds: float) -> np.ndarray:
    """Trim silent ends, cut one random window of at most ``max_seconds``, peak -1 dBFS."""
    nz = np.flatnonzero(np.abs(wav) > 1e-4)
    if nz.size == 0:
        raise RuntimeError("the render is silent")
    wav = wav[nz[0]:nz[-1] + 1]
    seg = int(max_seconds * SAMPLE_RATE)
    if len(wav) > seg:  # a random window, so long renders give varied training segments
        start = rng.randrange(len(wav) - seg)
        wav = wav[start:start + seg]
    return (wav * (10 ** (-1 / 20) / max(float(np.abs(wav).max()), 1e-9))).astype(np.float32)


def caption(meta: dict) -> str:
    what = COLLECTIONS.get(meta["collection"], meta["collection"])
    inst = " and ".join(meta["instruments"]) if len(meta["instruments"]) <= 2 else \
        ", ".join(meta["instruments"][:-1]) + " and " + meta["instruments"][-1]
    solo = "solo " if meta["n_parts"] == 1 else ""
    return (f"{what} for {solo}{inst}, {meta['bpm']} BPM, in {meta['key']}, "
            f"{meta['meter']} time")


def _job(args):
    idx, candidates, split, seed, out_dir, max_seconds = args
    errors = []
    for rel in candidates:  # a few corpus files trip music21's MIDI export: take the next
        rng = random.Random(seed * 1_000_003 + idx)
        try:
            wav, meta = (render_mma(rng, max_seconds) if rel == "mma" else
                         render_work(rel, rng, max_seconds))
            break
        except Exception as e:  # noqa: BLE001 - reported below if every candidate fails
            errors.append(f"{rel}: {type(e).__name__}: {e}")
    else:
        raise RuntimeError(f"render {idx}: every candidate work failed:\n" + "\n".join(errors))
    path = Path(out_dir) / split / f"{idx:06d}.flac"
    write_flac(path, wav, SAMPLE_RATE)
    return {"path": str(path.relative_to(out_dir)), "split": split, "sample_rate": SAMPLE_RATE,
            "duration": round(len(wav) / SAMPLE_RATE, 3), **meta}


def build_music_dataset(out_dir, n_renders: int = 50, seed: int = 0,
                        collections=tuple(COLLECTIONS), max_seconds: float = 30.0,
                        mma_fraction: float = 0.25, workers: int = 2) -> Path:
    """Render ``n_renders`` captioned segments into ``out_dir`` with a JSONL manifest.

    A fraction ``mma_fraction`` of the renders are MMA accompaniment styles (train split).
    """
    checks.integer("n_renders", n_renders, 1)
    checks.integer("seed", seed, 0, 2**63 - 1)
    checks.real("max_seconds", max_seconds, 0, 3600, lo_open=True)
    checks.real("mma_fraction", mma_fraction, 0, 1)
    checks.integer("workers", workers, 1, 256)
    if isinstance(collections, str):
        collections = (collections,)
    out_dir = checks.out_folder("out_dir", out_dir)
    require_tool("fluidsynth")
    require_tool(SOUNDFONT)
    if mma_fraction > 0:
        list_grooves()  # fail now, not in a worker, if mma is missing
    train, test = split_works(list_works(collections), seed)
    if not train:
        raise ValueError(f"no works found in collections {collections}")
    rng = random.Random(seed)
    jobs = []
    for i in range(n_renders):
        split = "test" if test and rng.random() < 0.1 else "train"
        if split == "train" and rng.random() < mma_fraction:
            candidates = ["mma"] * 2
        else:
            pool = test if split == "test" else train
            candidates = [rng.choice(pool) for _ in range(4)]
        jobs.append((i, candidates, split, seed, str(out_dir), max_seconds))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = run_jobs(_job, jobs, workers)
    return write_manifest(out_dir, rows)
