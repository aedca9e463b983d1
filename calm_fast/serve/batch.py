"""Batch generation as a job: a JSONL manifest in, one audio file per row out, resumable.

    calm-fast batch MANIFEST.jsonl OUTDIR --checkpoint LM.safetensors --vae VAE.safetensors
    run_batch("rows.jsonl", "out/", checkpoint="lm.safetensors", vae="vae.safetensors")

A manifest row is one JSON object per line:

    {"id": "utt1", "text": "Hello there.", "voice": "me.wav", "seed": 3, "temperature": 0.7,
     "cfg": 1.5, "steps": 1, "format": "flac", "max_seconds": 12}

``id`` (a file-name-safe string, unique) and one of ``text``, ``prompt`` (audio to continue:
a wav whose VAE latents the stream continues) or ``caption`` (music: a list of the
model's tags, or words read for them, model/music_tags.py: "slow Bach chorale for violin
in D minor") are required; ``text`` may be combined with ``voice`` (a
built-in name, prompt audio, a voice file, or a pocket-tts voice state exported from the
job's model) and ``prompt``. Unknown fields, wrong types and duplicate ids are errors that name the row
(its line and id). Relative audio paths are resolved against the manifest's folder.
Without ``seed`` a row's seed is derived from its id and the job's ``--seed`` (so a row's
audio does not depend on where it sits in the manifest or what runs beside it).

Rows stream through ONE Engine (continuous batching: the manifest is read lazily, at most
``window`` rows are in flight, a new row is submitted as soon as one finishes, and the
engine admits it into the first free slot). Rows that share a voice share its prefilled
prefix (``Engine.share``, kept in a small LRU). The engine decodes audio chunks with the
VAE as frames are made. A row with a ``steps`` other than the job's runs on a second
engine for that head-step count (created on first use; each engine has its own cache
budget).

Each finished row is written atomically to ``OUTDIR/<id>.<format>`` (a temporary file in
OUTDIR, then ``os.replace``) and then recorded in ``OUTDIR/results.jsonl``: status, output
(relative to OUTDIR), seconds and frames of audio, the seed, the model files (name and
sha256 prefix) and the calm_fast commit, or the row's error. A bad row is recorded and
skipped; it never stops or changes the others. Re-running the same command skips the rows
recorded ``ok`` whose file exists and retries the rest, so a killed job loses at most the
rows in flight; at the end the results file is compacted to one record per row.

The same job runs on a Ray cluster with ``--ray [ADDRESS]`` (calm_fast.serve.distributed
describes the pipeline; its code is the "on Ray" section at the end of this module).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from calm_fast import checks
from calm_fast.errors import MissingFileError
from calm_fast.provenance import code_commit, file_label

if TYPE_CHECKING:
    import torch

# torch and numpy are imported where they are used: building the CLI parser (register)
# stays cheap for the other commands.

FIELDS = ("id", "text", "prompt", "caption", "voice", "seed", "temperature", "cfg", "steps",
          "format", "max_seconds")
FORMATS = ("wav", "flac", "ogg", "mp3")
RESULTS = "results.jsonl"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class RowError(ValueError):
    """A manifest row that cannot run; the message names the row."""


@dataclass
class JobConfig:
    """Everything that shapes a job's outputs (the Ray workers get the same one)."""

    checkpoint: str | None = None  # the LM export (runtime/export.py)
    vae: str | None = None  # the VAE export
    seed: int = 0  # base of the per-row seeds derived from ids
    temperature: float = 0.7
    cfg: float = 1.0
    steps: int = 1  # head (LSD / consistency) steps per frame
    format: str = "wav"
    max_seconds: float = 30.0
    eos_threshold: float | None = -4.0  # None: no EOS, every row runs max_seconds
    frames_after_eos: int = 2
    voice_seconds: float = 10.0  # voice prompts are cut to this
    max_streams: int = 16
    cache_mb: float = 512.0  # KV-cache budget per engine
    decode_frames: int = 8
    window: int | None = None  # rows in flight (default 2 x max_streams)
    precision: str = "fp32"  # weights of the LM and head: fp32, bf16 or int8 (CPU)
    overlap: bool = True  # decode on a thread of its own while the engine makes frames
    base_dir: str | None = None  # relative audio paths resolve here (default: the manifest's)
    max_voices: int = 32  # prefilled voice templates kept (LRU)
    voice: str | None = None  # rows that name no voice use it (default: the bundle's)

    def check(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {FORMATS}, got {self.format!r}")
        for name, lo in (("max_streams", 1), ("steps", 1), ("decode_frames", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}")
        if not self.max_seconds > 0 or not self.cache_mb > 0:
            raise ValueError("--max-seconds and --cache-mb must be > 0")
        if self.window is not None and self.window < 1:
            raise ValueError("--window must be >= 1")
        checks.precision(self.precision)

    def resolve_model(self) -> None:
        """Fill in the shipped default bundle when neither --checkpoint nor --vae is given
        (and its default voice); check that both files exist."""
        from calm_fast.serve.models import DEFAULT_BUNDLE, bundle_info

        if not self.checkpoint and not self.vae and (DEFAULT_BUNDLE / "lm.safetensors").is_file():
            self.checkpoint = str(DEFAULT_BUNDLE / "lm.safetensors")
            self.vae = str(DEFAULT_BUNDLE / "vae.safetensors")
            if self.voice is None:
                self.voice = bundle_info(DEFAULT_BUNDLE).get("default_voice")
        for flag, p in (("--checkpoint", self.checkpoint), ("--vae", self.vae)):
            if not p:
                raise ValueError(f"{flag} is required with "
                                 f"{'--vae' if flag == '--checkpoint' else '--checkpoint'} "
                                 "(or give neither: the shipped default model)")
            if not Path(p).is_file():
                raise MissingFileError(f"{flag}: no file at {p}")


@dataclass
class Row:
    line: int
    id: str
    text: str | None = None
    prompt: str | None = None
    caption: list | str | None = None  # exact tags, or a caption to read for them
    voice: str | None = None
    seed: int = 0
    temperature: float = 0.7
    cfg: float = 1.0
    steps: int = 1
    format: str = "wav"
    max_seconds: float = 30.0


# -- the manifest -------------------------------------------------------------------------------
def iter_manifest(path):
    """(line number, line) of each non-blank line, read lazily."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def default_seed(row_id: str, base: int) -> int:
    """A row's seed when it gives none: from its id, so it does not depend on its place."""
    return (zlib.crc32(row_id.encode()) + 1_000_003 * base) % (2**31)


def _num(where, name, v, *, integer=False, lo=None):
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not math.isfinite(v) or (lo is not None and v < lo):
        kind = "an integer" if integer else "a number"
        raise RowError(f"{where}: {name} must be {kind}" + (f" >= {lo}" if lo is not None else "")
                       + f", got {v!r}")
    return v


def row_label(line: int, raw_id=None) -> str:
    return f"row {line}" + (f" (id {raw_id!r})" if raw_id is not None else "")


def parse_row(line: int, raw: str, cfg: JobConfig) -> Row:
    """A checked Row from one manifest line (RowError naming the row otherwise)."""
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RowError(f"{row_label(line)}: not JSON: {e}") from None
    if not isinstance(d, dict):
        raise RowError(f"{row_label(line)}: a row must be a JSON object, got "
                       f"{type(d).__name__}")
    rid = d.get("id")
    where = row_label(line, rid)
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise RowError(f"{where}: unknown field(s) {unknown}; known: {list(FIELDS)}")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not _ID.match(rid):
        raise RowError(f"{where}: id must be a string of letters, digits, '.', '_', '-' "
                       "(a file name), up to 200 characters")
    for k in ("text", "prompt", "voice"):
        if d.get(k) is not None and not isinstance(d[k], str):
            raise RowError(f"{where}: {k} must be a string")
    cap = d.get("caption")
    if cap is not None:
        if not (isinstance(cap, str) and cap.strip() or isinstance(cap, list) and cap
                and all(isinstance(t, str) for t in cap)):
            raise RowError(f"{where}: caption must be a non-empty string (words naming the "
                           "model's tags) or a non-empty list of tags")
    if d.get("text") is None and d.get("prompt") is None and cap is None:
        raise RowError(f"{where}: needs one of text, prompt or caption")
    fmt = d.get("format", cfg.format)
    if fmt not in FORMATS:
        raise RowError(f"{where}: format must be one of {list(FORMATS)}, got {fmt!r}")
    seed = d.get("seed")
    seed = default_seed(rid, cfg.seed) if seed is None else _num(where, "seed", seed,
                                                                  integer=True, lo=0)
    ms = _num(where, "max_seconds", d.get("max_seconds", cfg.max_seconds))
    if ms <= 0:
        raise RowError(f"{where}: max_seconds must be > 0, got {ms!r}")
    return Row(line, rid, d.get("text"), d.get("prompt"), cap, d.get("voice"), seed,
               float(_num(where, "temperature", d.get("temperature", cfg.temperature), lo=0)),
               float(_num(where, "cfg", d.get("cfg", cfg.cfg))),
               _num(where, "steps", d.get("steps", cfg.steps), integer=True, lo=1),
               fmt, float(ms))


# -- provenance ---------------------------------------------------------------------------------
# -- the results manifest -----------------------------------------------------------------------
def read_results(outdir) -> dict:
    """The last record of each (line, id) in OUTDIR/results.jsonl (a torn line is ignored)."""
    out = {}
    p = Path(outdir) / RESULTS
    if not p.exists():
        return out
    with open(p, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            out[(r.get("line"), r.get("id"))] = r
    return out


def done_ids(outdir) -> set:
    """Rows a re-run skips: recorded ok, with their file present."""
    return {r["id"] for r in read_results(outdir).values()
            if r.get("status") == "ok" and (Path(outdir) / r.get("output", "")).is_file()}


class ResultsWriter:
    """Appends one JSON line per finished row, flushed (a kill loses no finished row)."""

    def __init__(self, outdir):
        self.path = Path(outdir) / RESULTS
        self.f = open(self.path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec, sort_keys=True) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def compact_results(outdir) -> None:
    """Rewrite results.jsonl with one (the last) record per row, in line order; atomic."""
    recs = read_results(outdir)
    if not recs:
        return
    p = Path(outdir) / RESULTS
    tmp = p.with_name(f".{RESULTS}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in sorted(recs.values(), key=lambda r: (r.get("line") or 0, str(r.get("id")))):
            f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, p)


def write_atomic(path: Path, wav: torch.Tensor, sample_rate: int) -> float:
    """Write audio to ``path`` through a temporary file beside it; returns the gain."""
    from calm_fast.codec.audio import write_audio

    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        if wav.shape[-1] == 0:  # a row that ended at its first frame: an empty file
            import numpy as np
            import soundfile as sf

            from calm_fast.codec.audio import WRITE_SUBTYPES

            sf.write(str(tmp), np.zeros((0, wav.shape[0] if wav.dim() == 2 else 1), "float32"),
                     sample_rate, subtype=WRITE_SUBTYPES[path.suffix])
            gain = 1.0
        else:
            gain = write_audio(tmp, wav, sample_rate)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return gain


def clean_temporaries(outdir) -> None:
    for p in Path(outdir).glob(".*.tmp.*"):
        p.unlink(missing_ok=True)


# -- the job ------------------------------------------------------------------------------------
@dataclass
class _Flight:
    row: Row
    engine: int  # steps key
    voice: tuple | None  # the template key it holds a reference on
    chunks: list = field(default_factory=list)
    frames: int = 0


class Job:
    """The model loaded once, its engines, and the row loop (shared by the local run and
    each Ray worker). ``lm`` / ``vae``: modules to use instead of loading the files (then
    ``labels`` names them in the records)."""

    def __init__(self, cfg: JobConfig, outdir, *, lm=None, vae=None, labels: dict | None = None,
                 commit: str | None = None):
        from calm_fast.runtime.export import load_model

        cfg.check()
        self.cfg, self.outdir = cfg, Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        if lm is None or vae is None:
            cfg.resolve_model()
        self.lm = (lm if lm is not None else load_model(cfg.checkpoint, expect="calm")).eval()
        self.vae = (vae if vae is not None else load_model(cfg.vae, expect="vae")).eval()
        if self.lm.cfg.latent_dim != self.vae.cfg.latent_dim:
            raise ValueError(f"the LM makes {self.lm.cfg.latent_dim}-dim latents, the VAE "
                             f"takes {self.vae.cfg.latent_dim}")
        self.labels = labels or {"lm": file_label(cfg.checkpoint), "vae": file_label(cfg.vae)}
        self.commit = commit or code_commit()
        self.sample_rate = self.vae.cfg.sample_rate
        self.base_dir = Path(cfg.base_dir) if cfg.base_dir else Path.cwd()
        self.engines: dict = {}
        self.flights: dict = {}  # (steps, request id) -> _Flight
        self.templates: OrderedDict = OrderedDict()  # (steps, voice) -> [Shared, refs]
        self.voice_lat: OrderedDict = OrderedDict()  # voice path -> raw latents
        self.window = cfg.window or 2 * cfg.max_streams

    # -- pieces -------------------------------------------------------------------------------
    def engine(self, steps: int):
        from calm_fast.runtime.engine import Engine

        if steps not in self.engines:
            c = self.lm.cfg.backbone
            block_bytes = 2 * c.num_layers * c.kv_heads * c.head_dim * 4 * 16
            self.engines[steps] = Engine(
                self.lm, num_blocks=max(64, int(self.cfg.cache_mb * 2**20 // block_bytes)),
                max_streams=self.cfg.max_streams, head_steps=steps,
                precision=self.cfg.precision,
                vae=self.vae, decode_frames=self.cfg.decode_frames, overlap=self.cfg.overlap)
        return self.engines[steps]

    def _path(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.base_dir / p

    def _audio(self, path: str) -> torch.Tensor:
        from calm_fast.codec.audio import load_audio

        return load_audio(self._path(path), self.sample_rate)

    def _encode(self, path: str, seconds: float) -> torch.Tensor:
        """Raw VAE latents [T, C] of an audio file (cut to ``seconds``)."""
        import torch

        wav = self._audio(path)[:, :round(seconds * self.sample_rate)]
        if wav.shape[1] < self.vae.cfg.frame_size:
            raise ValueError(f"{path} is shorter than one frame ({self.vae.cfg.frame_size} "
                             "samples)")
        with torch.no_grad():
            return self.vae.encode(self.vae.pad(wav[None]))[0]

    def voice_latents(self, path: str):
        """Raw latents of a voice: a built-in name, a voice file or a prompt audio file; or
        a KVVoice for a pocket-tts voice state exported from this job's model."""
        from calm_fast.runtime.voices import builtin_voices, load_voice

        if path in self.voice_lat:
            self.voice_lat.move_to_end(path)
            return self.voice_lat[path]
        if path in builtin_voices():
            v = load_voice(builtin_voices()[path], self.lm.cfg.prompt_dim)
        elif path.endswith(".safetensors"):
            v = load_voice(self._path(path), self.lm.cfg.prompt_dim, self.lm)
        else:
            v = self._encode(path, self.cfg.voice_seconds)
        self.voice_lat[path] = v
        while len(self.voice_lat) > self.cfg.max_voices:
            self.voice_lat.popitem(last=False)
        return v

    def _template(self, steps: int, voice: str, v):
        from calm_fast.runtime.voices import KVVoice

        key = (steps, voice)
        if key not in self.templates:
            eng = self.engine(steps)
            self._evict(max(0, len(self.templates) + 1 - self.cfg.max_voices))
            shared = (eng.share_kv(v.k, v.v) if isinstance(v, KVVoice) else
                      eng.share(self.lm.prefix(voice=v).detach()))
            self.templates[key] = [shared, 0]
        self.templates.move_to_end(key)
        return key, self.templates[key][0]

    def _evict(self, n: int) -> int:
        """Drop up to ``n`` voice templates no request in flight uses (LRU first)."""
        dropped = 0
        for key in list(self.templates):
            if dropped >= n:
                break
            shared, refs = self.templates[key]
            if refs == 0:
                self.engines[key[0]].unshare(shared)
                del self.templates[key]
                dropped += 1
        return dropped

    def record(self, row: Row | None, *, line: int, rid=None, error: str | None = None,
               frames: int = 0, samples: int = 0, gain: float = 1.0) -> dict:
        rec = {"id": rid if row is None else row.id, "line": line,
               "model": self.labels, "commit": self.commit}
        if error is not None:
            rec.update(status="error", error=error)
            if row is not None:
                rec["seed"] = row.seed
        else:
            rec.update(status="ok", output=f"{row.id}.{row.format}", frames=frames,
                       seconds=round(samples / self.sample_rate, 6), seed=row.seed,
                       sample_rate=self.sample_rate, gain=round(gain, 6))
        return rec

    # -- a row in -------------------------------------------------------------------------------
    def start(self, row: Row) -> None:
        """Build a row's request and submit it (raises ValueError/OSError for a bad row)."""
        import torch

        with torch.no_grad():
            self._start(row)

    def _start(self, row: Row) -> None:
        from calm_fast.runtime.scheduler import Request
        from calm_fast.runtime.voices import text_inputs

        lm = self.lm
        voice = row.voice if row.voice is not None else (self.cfg.voice if row.text else None)
        v = None if voice is None else self.voice_latents(voice)
        prompt = None
        if row.prompt is not None:
            prompt = lm.normalize(self._encode(row.prompt, self.cfg.max_seconds * 10))
        tags = row.caption
        if isinstance(tags, str):
            from calm_fast.model.music_tags import required_tags

            tags = required_tags(tags, lm.cfg.music_tags, lm.cfg.name)
        prefix, rows = text_inputs(lm, text=row.text, voice=v, tags=tags)
        prefix = prefix.detach()
        frames = max(1, round(row.max_seconds * lm.cfg.frame_rate))
        if rows is not None:  # aligned text: the durations fix the length
            req = Request(prefix, max_frames=len(rows), temperature=row.temperature,
                          cfg_scale=row.cfg, seed=row.seed, prompt_latents=prompt,
                          frame_cond=rows.detach(), eos_threshold=None)
        else:
            req = Request(prefix, max_frames=frames, temperature=row.temperature,
                          cfg_scale=row.cfg, seed=row.seed, prompt_latents=prompt,
                          eos_threshold=self.cfg.eos_threshold,
                          frames_after_eos=self.cfg.frames_after_eos)
        eng = self.engine(row.steps)
        key = shared = None
        if v is not None:
            key, shared = self._template(row.steps, voice, v)
        rid = eng.submit(req, shared=shared)
        if key is not None:
            self.templates[key][1] += 1
        self.flights[(row.steps, rid)] = _Flight(row, row.steps, key)

    def _finish(self, fl: _Flight, error: str | None = None) -> dict:
        if fl.voice is not None and fl.voice in self.templates:
            self.templates[fl.voice][1] -= 1
        row = fl.row
        if error is not None:
            return self.record(row, line=row.line, error=error)
        import torch

        wav = torch.cat(fl.chunks, -1) if fl.chunks else torch.zeros(1, 0)
        try:
            gain, extra = self.store(row, wav)
        except (ValueError, OSError) as e:
            return self.record(row, line=row.line, error=f"{row_label(row.line, row.id)}: "
                               f"writing the audio failed: {e}")
        rec = self.record(row, line=row.line, frames=fl.frames, samples=wav.shape[-1],
                          gain=gain)
        rec.update(extra)
        return rec

    def store(self, row: Row, wav: torch.Tensor):
        """Write a finished row's audio: (gain, fields to add to its record). Here: the file
        OUTDIR/<id>.<format>, atomically (a Ray worker returns the bytes instead)."""
        return write_atomic(self.outdir / f"{row.id}.{row.format}", wav, self.sample_rate), {}

    # -- the loop -----------------------------------------------------------------------------
    def process(self, lines, skip=frozenset()):
        """Run manifest lines [(line number, text)] through the engines; yields one record
        per row as it finishes (bad rows at once). ``skip``: ids not to run (done)."""
        it = iter(lines)
        seen: set = set()
        exhausted = False
        while True:
            while not exhausted and len(self.flights) < self.window:
                try:
                    n, raw = next(it)
                except StopIteration:
                    exhausted = True
                    break
                row = None
                try:
                    row = parse_row(n, raw, self.cfg)
                    if row.id in skip:
                        continue
                    if row.id in seen:
                        raise RowError(f"{row_label(n, row.id)}: duplicate id (an earlier row "
                                       "has it)")
                    seen.add(row.id)
                    self.start(row)
                except (ValueError, OSError, RuntimeError) as e:
                    msg = str(e)
                    if row is not None and not msg.startswith("row "):
                        msg = f"{row_label(n, row.id)}: {msg}"
                    yield self.record(row, line=n, rid=None if row is not None else
                                      _raw_id(raw), error=msg)
            if not self.flights:
                if exhausted:
                    return
                continue
            for steps, eng in list(self.engines.items()):
                if not (eng.running or eng.queue_depth or eng.decoding):
                    continue
                events = eng.step()
                for ev in events:
                    fl = self.flights[(steps, ev.request)]
                    if ev.latent is not None:
                        fl.frames += 1
                    if ev.audio is not None:
                        fl.chunks.append(ev.audio.float().cpu())
                    if ev.finished:
                        del self.flights[(steps, ev.request)]
                        yield self._finish(fl)
                if not events and not eng.running and not eng.decoding and eng.queue_depth:
                    yield from self._unstick(steps, eng)

    def _unstick(self, steps, eng):
        """Nothing runs and the first waiting row does not fit: free unused voice
        templates; if that is not enough, that row fails (the cache is too small)."""
        if self._evict(len(self.templates)):
            return
        p = eng.waiting[0]
        eng.cancel(p.rid)
        fl = self.flights.pop((steps, p.rid))
        yield self._finish(fl, error=f"{row_label(fl.row.line, fl.row.id)}: needs {p.need} "
                           "cache blocks, more than are free: raise --cache-mb")


def _raw_id(raw: str):
    try:
        d = json.loads(raw)
        return d.get("id") if isinstance(d, dict) and isinstance(d.get("id"), (str, int)) else None
    except json.JSONDecodeError:
        return None


# -- the local run ------------------------------------------------------------------------------
class Progress:
    """tqdm over rows, with audio seconds, real-time factor and ETA (without tqdm: a line
    on stderr every 10 s)."""

    def __init__(self, total: int | None, enabled: bool):
        self.t0 = self.last = time.perf_counter()
        self.audio = 0.0
        self.failed = self.done = 0
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, unit="row", dynamic_ncols=True, file=sys.stderr)

    def update(self, rec: dict) -> None:
        self.audio += rec.get("seconds", 0.0)
        self.failed += rec.get("status") != "ok"
        self.done += 1
        now = time.perf_counter()
        rtf = f"{self.audio / max(now - self.t0, 1e-9):.2f}x"
        if self.bar is not None:
            self.bar.set_postfix(audio_s=f"{self.audio:.1f}", rtf=rtf, failed=self.failed,
                                 refresh=False)
            self.bar.update(1)
        elif self.enabled and now - self.last > 10:
            self.last = now
            print(f"batch: {self.done} rows ({self.failed} failed), {self.audio:.1f} s of "
                  f"audio, {rtf} real time", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def count_rows(path) -> int:
    return sum(1 for _ in iter_manifest(path))


def run_batch(manifest, outdir, *, checkpoint=None, vae=None, progress: bool = True,
              ray_address: str | None = None, workers: int = 1, cpus_per_worker: float = 1,
              gpus_per_worker: float = 0, lm_model=None, vae_model=None,
              labels: dict | None = None, **options) -> dict:
    """Run (or resume) a batch job; returns a summary dict (rows ok / failed / skipped,
    audio seconds, wall seconds, real-time factor, the results path). ``options``: the
    JobConfig fields (seed, temperature, cfg, steps, format, max_seconds, eos_threshold,
    max_streams, cache_mb, decode_frames, window, precision, ...). ``ray_address`` not None:
    the same job on Ray (calm_fast.serve.distributed; "" or "auto" as ray.init takes them)."""
    manifest, outdir = Path(manifest), Path(outdir)
    if not manifest.is_file():
        raise MissingFileError(f"no manifest at {manifest}")
    cfg = JobConfig(checkpoint=None if checkpoint is None else str(checkpoint),
                    vae=None if vae is None else str(vae), **options)
    if cfg.base_dir is None:
        cfg.base_dir = str(manifest.resolve().parent)
    cfg.check()
    outdir.mkdir(parents=True, exist_ok=True)
    clean_temporaries(outdir)
    skip = done_ids(outdir)
    if ray_address is not None:
        return run_ray(manifest, outdir, cfg, skip=skip, address=ray_address, workers=workers,
                       cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                       progress=progress)
    job = Job(cfg, outdir, lm=lm_model, vae=vae_model, labels=labels)
    total = count_rows(manifest) - len(skip) if progress else None
    bar = Progress(total, progress)
    out = ResultsWriter(outdir)
    try:
        for rec in job.process(iter_manifest(manifest), skip=skip):
            out.write(rec)
            bar.update(rec)
    finally:
        out.close()
        bar.close()
    return _summary(bar, outdir, skip)


def _summary(bar: Progress, outdir: Path, skip) -> dict:
    """The job's summary from the counts its progress (fed every record) kept."""
    compact_results(outdir)
    wall = time.perf_counter() - bar.t0
    return {"ok": bar.done - bar.failed, "failed": bar.failed, "skipped": len(skip),
            "audio_s": round(bar.audio, 3), "wall_s": round(wall, 3),
            "rtf": round(bar.audio / wall, 3) if wall > 0 else None,
            "results": str(outdir / RESULTS)}


# -- on Ray (calm_fast.serve.distributed is its public face) ----------------------------------
PENDING = ".pending"


def _ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError("--ray needs Ray: pip install 'calm_fast[ray]'") from None
    return ray


class BatchWorker:
    """A Ray actor (map_batches' callable class): the model loaded once, one Job."""

    def __init__(self, cfg: dict, lm_bytes, vae_bytes, labels: dict, commit: str,
                 threads: int = 1):
        import torch

        from calm_fast.runtime.export import load_model

        torch.set_num_threads(max(1, threads))
        self.tmp = Path(tempfile.mkdtemp(prefix="calm_fast_worker_"))
        models = {}
        for kind, blob in (("calm", lm_bytes), ("vae", vae_bytes)):
            if not isinstance(blob, (bytes, bytearray)):  # an object ref (the driver's file)
                import ray

                blob = ray.get(blob)
            p = self.tmp / f"{kind}.safetensors"
            p.write_bytes(blob)
            models[kind] = load_model(p, expect=kind)
            p.unlink()
        job = Job(JobConfig(**cfg), self.tmp / "audio", lm=models["calm"], vae=models["vae"],
                  labels=labels, commit=commit)
        job.store = self._store
        self.job = job

    def _store(self, row, wav):
        """Encode the row's file as the local run writes it; return its bytes."""
        p = self.tmp / f"{row.id}.{row.format}"
        gain = write_atomic(p, wav, self.job.sample_rate)
        data = p.read_bytes()
        p.unlink()
        return gain, {"_audio": data}

    def rows(self, batch):
        for s in batch["text"]:
            d = json.loads(str(s))
            yield d["line"], d["raw"]

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        recs = list(self.job.process(self.rows(batch)))
        audio = [r.pop("_audio", b"") for r in recs]
        return {"record": np.array([json.dumps(r, sort_keys=True) for r in recs], dtype=object),
                "audio": np.array(audio, dtype=object)}


def _pending(manifest, outdir: Path, cfg: JobConfig, skip, job_labels, commit, out, bar,
             chunk_rows: int) -> tuple[Path, int, int]:
    """Check every row on the driver (the records of bad and duplicate rows are written
    here, as the local run writes them) and write the rows to run as chunk files."""
    d = outdir / PENDING
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    seen, n_rows, failed, f, k = set(), 0, 0, None, 0
    base = {"model": job_labels, "commit": commit}
    for n, raw in iter_manifest(manifest):
        row = None
        try:
            row = parse_row(n, raw, cfg)
            if row.id in skip:
                continue
            if row.id in seen:
                raise RowError(f"{row_label(n, row.id)}: duplicate id (an earlier row has it)")
            seen.add(row.id)
        except ValueError as e:
            rec = {**base, "id": row.id if row is not None else _raw_id(raw), "line": n,
                   "status": "error", "error": str(e)}
            if row is not None:
                rec["seed"] = row.seed
            out.write(rec)
            bar.update(rec)
            failed += 1
            continue
        if f is None or n_rows % chunk_rows == 0:
            if f is not None:
                f.close()
            f = open(d / f"{k:06d}.jsonl", "w", encoding="utf-8")
            k += 1
        f.write(json.dumps({"line": n, "raw": raw.strip()}) + "\n")
        n_rows += 1
    if f is not None:
        f.close()
    return d, n_rows, failed


def run_ray(manifest, outdir, cfg: JobConfig, *, skip=frozenset(), address: str | None = "",
            workers: int = 1, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
            progress: bool = True, batch_rows: int | None = None, chunk_rows: int = 1024,
            worker_cls=BatchWorker) -> dict:
    """The batch job on Ray (see the module docstring); the summary of ``run_batch``.
    ``address``: as ``ray.init`` takes it ("" / None: RAY_ADDRESS, else a new local
    instance; "auto"; "ray://host:10001"); an already initialised Ray is used as is.
    ``batch_rows``: rows per map_batches call (default 4 x max_streams)."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    manifest, outdir = Path(manifest), Path(outdir)
    if workers < 1 or cpus_per_worker <= 0 or gpus_per_worker < 0:
        raise ValueError("need --workers >= 1, --cpus-per-worker > 0, --gpus-per-worker >= 0")
    cfg.resolve_model()
    labels = {"lm": file_label(cfg.checkpoint), "vae": file_label(cfg.vae)}
    commit = code_commit()
    out = ResultsWriter(outdir)
    bar = Progress(None, progress)
    pend = outdir / PENDING
    started = False
    try:
        pend, n_rows, failed = _pending(manifest, outdir, cfg, skip, labels, commit, out, bar,
                                        chunk_rows)
        if bar.bar is not None:
            bar.bar.total = n_rows + failed
            bar.bar.refresh()
        if n_rows:
            if not ray.is_initialized():  # ours to start, ours to stop
                ray.init(address=address or None, include_dashboard=False,
                         log_to_driver=False)
                started = True
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                  soft=False)
            refs = [ray.put(Path(p).read_bytes()) for p in (cfg.checkpoint, cfg.vae)]
            ds = ray.data.read_text(str(pend), num_cpus=0,
                                    ray_remote_args={"scheduling_strategy": here})
            ds = ds.map_batches(
                worker_cls, batch_size=batch_rows or 4 * cfg.max_streams, batch_format="numpy",
                fn_constructor_kwargs=dict(cfg=asdict(cfg), lm_bytes=refs[0],
                                           vae_bytes=refs[1], labels=labels, commit=commit,
                                           threads=int(cpus_per_worker)),
                concurrency=workers, num_cpus=cpus_per_worker,
                num_gpus=gpus_per_worker or None,
                max_restarts=-1, max_task_retries=-1)  # a dead worker: its batch again
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for s, data in zip(b["record"], b["audio"]):
                    rec = json.loads(str(s))
                    if rec["status"] == "ok":
                        try:
                            _write_bytes(outdir / rec["output"], bytes(data))
                        except OSError as e:
                            rec = {k: rec[k] for k in ("id", "line", "model", "commit", "seed")}
                            rec.update(status="error", error=f"{row_label(rec['line'], rec['id'])}"
                                       f": writing the audio failed: {e}")
                    out.write(rec)
                    bar.update(rec)
    finally:
        out.close()
        bar.close()
        shutil.rmtree(pend, ignore_errors=True)
        if started:
            ray.shutdown()
    return _summary(bar, outdir, skip)


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# -- the command --------------------------------------------------------------------------------
def register(subparsers) -> argparse.ArgumentParser:
    """Add ``batch`` to an argparse subparsers object (calm_fast.cli calls it)."""
    p = subparsers.add_parser(
        "batch", help="generate audio for every row of a JSONL manifest (resumable)",
        description=__doc__.split("\n")[0])
    p.add_argument("manifest", help="JSONL: one {id, text|prompt|caption, ...} object a line")
    p.add_argument("outdir", help="audio files and results.jsonl go here")
    p.add_argument("--checkpoint", "--lm", dest="checkpoint",
                   help="the LM export (model.safetensors from `calm-fast train lm`)")
    p.add_argument("--vae", help="the VAE export (vae.safetensors from `calm-fast train vae`)")
    d = JobConfig()
    p.add_argument("--seed", type=int, default=d.seed, help="base of the per-row seeds")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--cfg", type=float, default=d.cfg, help="latent CFG scale (1: none)")
    p.add_argument("--steps", type=int, default=d.steps, help="head steps per frame")
    p.add_argument("--format", default=d.format, choices=FORMATS)
    p.add_argument("--max-seconds", type=float, default=d.max_seconds)
    p.add_argument("--eos-threshold", default=str(d.eos_threshold),
                   help="EOS logit threshold, or 'off' (every row runs --max-seconds)")
    p.add_argument("--max-streams", type=int, default=d.max_streams,
                   help="rows generating at once")
    p.add_argument("--cache-mb", type=float, default=d.cache_mb, help="KV-cache budget")
    p.add_argument("--decode-frames", type=int, default=d.decode_frames)
    p.add_argument("--window", type=int, default=None, help="rows in flight (2 x streams)")
    p.add_argument("--precision", choices=checks.PRECISIONS, default="fp32",
                   help="weights of the LM and its head: fp32 (default), bf16 (half the "
                   "bytes; bf16 rows, fp32 sums) or int8 (CPU)")
    p.add_argument("--int8", action="store_true",
                   help="the same as --precision int8 (default: off)")
    p.add_argument("--no-overlap", action="store_true",
                   help="decode on the engine's thread, after each frame step (default: on a "
                   "thread and core of its own, while the next frames are made)")
    p.add_argument("--voice", default=None,
                   help="voice of text rows that name none: a built-in name, a voice file or "
                        "a prompt audio file (default: the shipped model's default voice)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray (no ADDRESS: RAY_ADDRESS or a local instance)")
    p.add_argument("--workers", type=int, default=1, help="Ray actors, each with an engine")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.set_defaults(fn=_cmd)
    return p


def _eos(s: str):
    if s.strip().lower() in ("off", "none", ""):
        return None
    try:
        return float(s)
    except ValueError:
        raise ValueError(f"--eos-threshold must be a number or 'off', got {s!r}") from None


def _cmd(a) -> None:
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.ray is None and (a.workers != 1 or a.gpus_per_worker):
        raise ValueError("--workers / --gpus-per-worker need --ray")
    s = run_batch(a.manifest, a.outdir, checkpoint=a.checkpoint, vae=a.vae,
                  progress=not a.no_progress, ray_address=a.ray, workers=a.workers,
                  cpus_per_worker=a.cpus_per_worker, gpus_per_worker=a.gpus_per_worker,
                  seed=a.seed, temperature=a.temperature, cfg=a.cfg, steps=a.steps,
                  format=a.format, max_seconds=a.max_seconds, eos_threshold=_eos(a.eos_threshold),
                  max_streams=a.max_streams, cache_mb=a.cache_mb, decode_frames=a.decode_frames,
                  window=a.window, precision=checks.precision(a.precision, a.int8),
                  voice=a.voice, overlap=not a.no_overlap)
    print(f"batch: {s['ok']} ok, {s['failed']} failed, {s['skipped']} already done; "
          f"{s['audio_s']:.1f} s of audio in {s['wall_s']:.1f} s ({s['rtf']}x real time); "
          f"results in {s['results']}")


def main(argv=None) -> int:
    """``calm-fast batch`` on its own (the same exit codes as calm_fast.cli)."""
    p = argparse.ArgumentParser(prog="calm-fast")
    register(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"calm-fast: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
