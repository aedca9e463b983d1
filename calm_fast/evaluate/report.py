"""Score a set of generated audio files (``calm-fast eval``): one JSON report + a table.

The set is a JSONL manifest, one row per file, or a directory of audio files (a
``manifest.jsonl`` inside is used when present; otherwise each file's text comes from a
``.txt`` beside it). Row fields, all optional but ``path``, paths relative to the manifest:

    path       the audio to score
    text       what it should say: WER and CER (whisper tiny.en)
    prompt     the voice prompt it was made from: speaker similarity to it, and to the
               prompts of the other speakers' rows ("higher than to other voices")
    speaker    who that prompt is (rows with the same speaker are not "other voices")
    reference  the audio it reconstructs (a codec round trip): STOI, PESQ-WB, mel distance;
               with ``delay`` (samples the reconstruction lags the reference by)
    caption    a music caption: the key it names against the key estimated from the audio
    kind       "speech" (default) or "music": music rows get chroma, key and tempo, no ASR
    group      rows are also summed up per group (e.g. default voice / held-out voices)

Every metric whose inputs a row lacks is skipped for that row; the summary gives each
metric's mean (WER/CER: corpus rates) and how many rows it covers.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from calm_fast.codec.audio import AUDIO_SUFFIXES, read_audio
from calm_fast.errors import ArgumentError
from calm_fast.model.music_tags import parse_key
from calm_fast.provenance import code_commit

METRICS = ("wer", "sim", "signal", "music", "dnsmos")
DEFAULT_METRICS = ("wer", "sim", "signal", "music")


def read_rows(source) -> tuple[list[dict], Path]:
    """(rows with absolute paths, base folder) of a manifest file or an audio folder."""
    src = Path(source)
    if src.is_dir():
        man = src / "manifest.jsonl"
        if not man.is_file():
            files = sorted(p for p in src.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
            if not files:
                raise ArgumentError(f"{src} holds no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) "
                                    f"and no manifest.jsonl")
            rows = []
            for p in files:
                row = {"path": p.name}
                if p.with_suffix(".txt").is_file():
                    row["text"] = p.with_suffix(".txt").read_text().strip()
                rows.append(row)
            return _absolute(rows, src), src
        src = man
    if not src.is_file():
        raise ArgumentError(f"no manifest or folder at {src}")
    rows = []
    for n, line in enumerate(src.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ArgumentError(f"{src}:{n}: not JSON: {e}") from e
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise ArgumentError(f"{src}:{n}: a row must be an object with a 'path' string")
        rows.append(row)
    if not rows:
        raise ArgumentError(f"{src} lists no files")
    return _absolute(rows, src.parent), src.parent


def _absolute(rows, base: Path) -> list[dict]:
    out = []
    for r in rows:
        r = dict(r)
        for k in ("path", "prompt", "reference"):
            if isinstance(r.get(k), str) and r[k]:
                r[k] = str((base / r[k]) if not Path(r[k]).is_absolute() else Path(r[k]))
        out.append(r)
    return out


def _mono(path) -> tuple[torch.Tensor, int]:
    wav, sr = read_audio(path)
    return wav.mean(0), sr


@dataclass
class Scorer:
    metrics: tuple[str, ...] = DEFAULT_METRICS
    threads: int = 2
    _asr: object = field(default=None, repr=False)
    _spk: object = field(default=None, repr=False)
    _emb: dict = field(default_factory=dict, repr=False)

    def asr(self):
        if self._asr is None:
            from calm_fast.evaluate.asr import WhisperASR
            self._asr = WhisperASR(self.threads)
        return self._asr

    def embed(self, path, wav=None, sr=None):
        if path not in self._emb:
            if self._spk is None:
                from calm_fast.evaluate.speaker import SpeakerEncoder
                self._spk = SpeakerEncoder()
            if wav is None:
                wav, sr = _mono(path)
            self._emb[path] = self._spk.embed(wav, sr)
        return self._emb[path]

    def score(self, row: dict, others: list[str]) -> dict:
        """Metrics of one row; ``others``: prompts of the other speakers' rows."""
        from calm_fast.evaluate import music, signal
        from calm_fast.evaluate.asr import char_errors, word_errors

        wav, sr = _mono(row["path"])
        out = {"path": row["path"], "seconds": round(wav.shape[-1] / sr, 3)}
        is_music = row.get("kind", "speech") == "music"
        if "wer" in self.metrics and not is_music and row.get("text"):
            hyp = self.asr().transcribe(wav, sr)
            (we, wn), (ce, cn) = word_errors(row["text"], hyp), char_errors(row["text"], hyp)
            out.update(hyp=hyp, word_edits=we, words=wn, char_edits=ce, chars=cn)
        if "sim" in self.metrics and not is_music and row.get("prompt"):
            e = self.embed(row["path"], wav, sr)
            from calm_fast.evaluate.speaker import cosine
            out["sim_prompt"] = cosine(e, self.embed(row["prompt"]))
            if others:
                out["sim_other"] = sum(cosine(e, self.embed(p)) for p in others) / len(others)
        if row.get("reference") and ("signal" in self.metrics or
                                     ("music" in self.metrics and is_music)):
            ref, rsr = _mono(row["reference"])
            if rsr != sr:
                raise ArgumentError(f"{row['path']} is {sr} Hz, its reference {rsr} Hz")
            d = int(row.get("delay", 0))
            deg = wav[d:]
            if is_music:
                out["chroma_corr"] = music.chroma_correlation(ref, deg, sr)
            elif "signal" in self.metrics:
                out["stoi"] = signal.stoi(ref, deg, sr)
                out["pesq"] = signal.pesq_wb(ref, deg, sr)
                out["mel_dist"] = signal.mel_distance(ref, deg, sr)
        if "music" in self.metrics and is_music:
            out["key"] = music.estimate_key(wav, sr)
            want = parse_key(row.get("caption", "") or "")
            if want:
                out["key_wanted"], out["key_match"] = want, float(out["key"] == want)
            out["tempo"] = music.tempo(wav, sr)
        if "dnsmos" in self.metrics and not is_music:
            from calm_fast.evaluate.quality import dnsmos
            out.update({f"dnsmos_{k}": v for k, v in dnsmos(wav, sr).items()})
        return out


_MEANS = ("sim_prompt", "sim_other", "stoi", "pesq", "mel_dist", "chroma_corr", "key_match",
          "dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak", "seconds")


def summarize(scores: list[dict]) -> dict:
    s: dict = {"files": len(scores)}
    w = [r for r in scores if "words" in r]
    if w and sum(r["words"] for r in w):
        s["wer"] = sum(r["word_edits"] for r in w) / sum(r["words"] for r in w)
        s["cer"] = sum(r["char_edits"] for r in w) / max(1, sum(r["chars"] for r in w))
        s["wer_files"] = len(w)
    for k in _MEANS:
        v = [r[k] for r in scores if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if v:
            s[k] = sum(v) / len(v)
            s[f"{k}_files"] = len(v)
    both = [r for r in scores if "sim_prompt" in r and "sim_other" in r]
    if both:
        s["sim_above_other"] = sum(r["sim_prompt"] > r["sim_other"] for r in both) / len(both)
    if "key_match" in s:
        s["key_chance"] = 1 / 24
    return s


def evaluate(source, metrics=DEFAULT_METRICS, model: str = "", threads: int = 2,
             limit: int = 0, progress: bool = True) -> dict:
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ArgumentError(f"unknown metrics {bad}; choose from {list(METRICS)}")
    rows, base = read_rows(source)
    if limit:
        rows = rows[:limit]
    missing = [r["path"] for r in rows if not Path(r["path"]).is_file()]
    if missing:
        raise ArgumentError(f"{len(missing)} listed files do not exist, e.g. {missing[0]}")
    torch.set_num_threads(threads)
    scorer = Scorer(tuple(metrics), threads)
    prompts = {}
    for r in rows:
        if r.get("prompt"):
            prompts.setdefault(r["prompt"], r.get("speaker", r["prompt"]))
    it = rows
    if progress:
        from tqdm import tqdm
        it = tqdm(rows, desc="eval", unit="file", file=sys.stderr)
    scores = []
    for r in it:
        me = r.get("speaker", r.get("prompt"))
        others = [p for p, spk in prompts.items() if spk != me]
        s = scorer.score(r, others)
        if "group" in r:
            s["group"] = r["group"]
        scores.append(s)
    groups = sorted({s["group"] for s in scores if "group" in s}, key=str)
    return {"model": model or next((r["model"] for r in rows if r.get("model")), ""),
            "code": code_commit(), "source": str(source),
            "metrics": list(metrics), "summary": summarize(scores),
            "groups": {str(g): summarize([s for s in scores if s.get("group") == g])
                       for g in groups},
            "rows": scores}


def table(report: dict) -> str:
    """The summary (and each group's) as a text table."""
    cols = ["files", "wer", "cer", "sim_prompt", "sim_other", "sim_above_other", "stoi",
            "pesq", "mel_dist", "chroma_corr", "key_match", "dnsmos_ovrl"]
    sets = [("all", report["summary"])] + list(report["groups"].items())
    used = [c for c in cols if any(c in s for _, s in sets)]
    head = ["set"] + used
    lines = [head]
    for name, s in sets:
        lines.append([name] + [("-" if c not in s else f"{s[c]:.3f}" if isinstance(s[c], float)
                                else str(s[c])) for c in used])
    w = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = [f"model {report['model'] or '?'}  code {report['code']}  source {report['source']}"]
    out += ["  ".join(x.rjust(w[i]) for i, x in enumerate(r)) for r in lines]
    return "\n".join(out)
