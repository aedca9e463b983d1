"""The commands behind ``calm-fast tts | continue | music | export-voice | voices``, as Python
functions (the CLI parses flags and calls these):

    synth = load_synth("lm.safetensors", vae="vae.safetensors")
    tts(synth, "Hello there.", "out.wav", voice="me.wav", seed=0)
    continue_audio(synth, "prompt.wav", "more.wav", seconds=5)
    music(synth, "slow jazz piano", "tune.wav", seconds=10)
    export_voice(synth, "me.wav", "me.safetensors")
    voices()                                          # built-in voice names

They run on the same Service (engine thread, streamed decoder) as ``calm-fast serve``; the
output is written as it is made (``out="-"``: to stdout, a streamed WAV or raw bytes).
"""
from __future__ import annotations

import sys
from pathlib import Path

from calm_fast.serve.audio_out import FORMATS, Tempo, encoder, wav_header, to_pcm16
from calm_fast.serve.service import Job, JobError, Segment, Service


def _format_of(out: str, fmt: str | None) -> str:
    if fmt:
        f = fmt.lower()
    elif out == "-":
        f = "wav"
    else:
        f = Path(out).suffix.lower().lstrip(".") or "wav"
        f = {"ogg": "opus", "m4a": "aac", "raw": "pcm"}.get(f, f)
    if f not in FORMATS:
        raise ValueError(f"unknown output format {f!r}: use one of {', '.join(FORMATS)}")
    return f


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total_s: float | None, desc: str, quiet: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # the serve extra brings it; without it, no bar
        return _NoBar()

    return tqdm(total=None if total_s is None else round(total_s, 1), desc=desc,
                unit="s audio", disable=quiet or None, file=sys.stderr,
                bar_format="{desc}: {n:.1f}{unit} [{elapsed}, {rate_fmt}]" if total_s is None
                else None)


def run_job(synth, job: Job, out: str, fmt: str | None = None, speed: float = 1.0,
            quiet: bool = False, desc: str = "generating", total_s: float | None = None,
            service: Service | None = None) -> dict:
    """Run ``job`` and write its audio to ``out`` (a path, or "-" for stdout)."""
    f = _format_of(out, fmt)
    own = service is None
    svc = service or Service(synth, max_streams=1).start()
    sr = synth.sample_rate
    tempo = Tempo(speed, sr) if speed != 1.0 else None
    stream = out == "-"
    dst = sys.stdout.buffer if stream else None
    wav_file = f == "wav" and not stream
    enc = None
    n = 0
    bar = _progress(total_s, desc, quiet)
    tmp = None
    try:
        if not stream:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(out).with_name(Path(out).name + ".part")
            dst = open(tmp, "wb")
            if wav_file:
                dst.write(wav_header(sr, 0))
        if not wav_file:
            enc = encoder(f, sr, file=None if stream or f == "pcm" else dst)
        svc.submit(job)

        def put(x):
            nonlocal n
            if not len(x):
                return
            n += len(x)
            if wav_file:
                dst.write(to_pcm16(x))
            else:
                dst.write(enc.write(x))
            if stream:
                dst.flush()

        for kind, x in job.chunks(timeout=600):
            if kind == "error":
                raise JobError(x)
            if kind == "audio":
                bar.update(round(len(x) / sr, 3))
                put(tempo.process(x) if tempo else x)
        if tempo:
            put(tempo.flush())
        if not wav_file:
            dst.write(enc.close())
            dst.flush()
        if wav_file:  # the real sizes, now that they are known
            dst.seek(0)
            dst.write(wav_header(sr, n))
        if not stream:
            dst.close()
            tmp.replace(out)
    finally:
        bar.close()
        if own:
            svc.close()
        if tmp is not None and tmp.exists():
            dst.close()
            tmp.unlink()
    return {"out": out, "format": f, "seconds": n / sr, "sample_rate": sr}


def _voice(synth, voice):
    from calm_fast.runtime.voices import resolve_voice

    if voice is None:
        voice = synth.default_voice
        if voice is None:
            return None
    if not synth.can_clone:
        raise ValueError(f"model {synth.name!r} takes no voice prompt")
    return resolve_voice(voice, synth.encoder, synth.lm.cfg.prompt_dim, synth.lm)


def tts(synth, text: str, out: str, *, voice=None, temperature: float | None = None,
        cfg: float = 1.0, steps: int | None = None, seed: int | None = 0, speed: float = 1.0,
        fmt: str | None = None, max_seconds: float = 30.0, quiet: bool = False) -> dict:
    """Speak ``text`` (pauses and sentence chunks: runtime.text_chunks) into ``out``."""
    if steps is not None:
        synth.head_steps = steps
    job = Job.speech(synth, text, voice=_voice(synth, voice), seed=seed,
                     temperature=synth.temperature if temperature is None else temperature,
                     cfg_scale=cfg, max_seconds=max_seconds, eos_threshold=synth.eos_threshold)
    return run_job(synth, job, out, fmt, speed, quiet, "speaking")


def continue_audio(synth, prompt, out: str, *, seconds: float = 5.0, temperature=None,
                   cfg: float = 1.0, seed: int | None = 0, fmt=None, quiet=False,
                   prompt_seconds: float = 10.0) -> dict:
    """``seconds`` of audio continuing the prompt audio file (the continuation only)."""
    from calm_fast.runtime.voices import encode_prompt

    if seconds <= 0:
        raise ValueError(f"--seconds must be positive, got {seconds}")
    lat = encode_prompt(synth.encoder, prompt, max_seconds=prompt_seconds)
    job = Job([Segment()], prompt=synth.lm.normalize(lat), seed=seed, cfg_scale=cfg,
              temperature=synth.temperature if temperature is None else temperature,
              max_seconds=seconds, eos_threshold=None)
    return run_job(synth, job, out, fmt, 1.0, quiet, "continuing", total_s=seconds)


def music(synth, caption: str, out: str, *, seconds: float = 10.0, temperature=None,
          cfg: float = 1.0, seed: int | None = 0, fmt=None, quiet=False) -> dict:
    """``seconds`` of music for a caption (matched against the model's tags; a model with
    text input reads the caption as text)."""
    if seconds <= 0:
        raise ValueError(f"--seconds must be positive, got {seconds}")
    if synth.music_tags:  # model/music_tags.py reads the caption
        from calm_fast.model.music_tags import required_tags

        seg = Segment(tags=required_tags(caption, synth.music_tags, synth.name))
    elif synth.can_speak:
        seg = Segment(text=caption)
    else:
        raise ValueError(f"model {synth.name!r} has neither music tags nor text input")
    job = Job([seg], seed=seed, cfg_scale=cfg, max_seconds=seconds, eos_threshold=None,
              temperature=synth.temperature if temperature is None else temperature)
    return run_job(synth, job, out, fmt, 1.0, quiet, "composing", total_s=seconds)


def export_voice(synth, audio, out, *, seconds: float = 10.0) -> dict:
    """Encode a prompt once and keep its latents in a voice file (loads with --voice)."""
    from calm_fast.runtime.voices import encode_prompt, save_voice

    lat = encode_prompt(synth.encoder, audio, max_seconds=seconds)
    save_voice(out, lat, synth.encoder)
    return {"out": str(out), "frames": int(lat.shape[0]),
            "seconds": lat.shape[0] / synth.frame_rate}


def voices(extra_dirs=()) -> list[dict]:
    """The built-in voices (and the voice files of ``extra_dirs``)."""
    from calm_fast.runtime.voices import builtin_voices, voice_info

    out = [{**voice_info(p), "builtin": True} for p in builtin_voices().values()]
    for d in extra_dirs:
        out += [{**voice_info(p), "builtin": False} for p in sorted(Path(d).glob("*.safetensors"))]
    return out
