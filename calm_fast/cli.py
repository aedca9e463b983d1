"""The ``calm-fast`` command line.

    calm-fast tts "Hello there." -o out.wav [--voice me.wav] [--checkpoint LM --vae VAE]
    calm-fast continue PROMPT.wav --seconds 5 -o more.wav
    calm-fast music "slow jazz piano" --seconds 10 -o tune.wav
    calm-fast export-voice me.wav me.safetensors
    calm-fast voices
    calm-fast serve [--host 127.0.0.1] [--port 8000]
    calm-fast data speech OUT [--n 200 | --hours H] [--eval N] [--seed 0] [--workers 2]
    calm-fast data music OUT [--n 50] [--seed 0] [--seconds 30]
    calm-fast data latents MANIFEST VAE.safetensors OUT
    calm-fast data align LATENTS MANIFEST [--steps 600]
    calm-fast train vae|lm|distill RECIPE.toml [--set section.key=value ...]
    calm-fast info

Every command runs as a Python function too (``calm_fast.serve.commands``). Exit codes: 0
done, 1 an error (one line saying what to fix), 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys

from calm_fast import checks


def _data_speech(a):
    from .data.speech import build_speech_dataset

    m = build_speech_dataset(a.out, n_utterances=a.n if a.hours is None else 0,
                             hours=a.hours, seed=a.seed, n_pseudo=a.pseudo, workers=a.workers,
                             held_out_voices=a.held_out, n_eval=a.eval,
                             eval_all_base=a.eval_all_base,
                             wer_threshold=a.wer_threshold,
                             progress=not a.quiet)
    print(f"wrote {m}")


def _data_music(a):
    from .data.music import build_music_dataset

    m = build_music_dataset(a.out, n_renders=a.n, seed=a.seed, max_seconds=a.seconds,
                            mma_fraction=a.mma, workers=a.workers)
    print(f"wrote {m}")


def _data_latents(a):
    from .data.latents import build_latent_cache
    from calm_fast.runtime.export import load_model

    vae = load_model(a.vae, expect="vae")
    c = vae.cfg
    out = build_latent_cache(a.manifest, lambda x: vae.encode(vae.pad(x)).transpose(1, 2),
                             a.out, sample_rate=c.sample_rate, frame_rate=c.frame_rate,
                             latent_dim=c.latent_dim, encoder_name=str(a.vae), force=a.force)
    print(f"wrote {out}")


def _data_align(a):
    import torch

    from calm_fast.model.phonemes import PhonemeTokenizer
    from calm_fast.train.aligner import align_cache

    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"wrote {align_cache(a.latents, a.manifest, PhonemeTokenizer(), steps=a.steps, seed=a.seed)}")


def _train(a):
    import torch

    from calm_fast.train.recipes import run_recipe

    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"wrote {run_recipe(a.recipe, a.kind, a.set, force=a.force)}")


def _info(a):
    import torch

    import calm_fast

    from calm_fast.fast import ops

    native = ops.native_info()
    try:
        import triton

        tri = triton.__version__
    except ImportError:
        tri = "not installed"
    print(json.dumps({"calm_fast": calm_fast.__version__, "torch": torch.__version__,
                      "cuda": torch.cuda.is_available(), "native extension": native,
                      "triton": tri}, indent=1))


# -- the doors: tts / continue / music / export-voice / voices / serve ---------------------
def _synth(a):
    from calm_fast.serve.models import load_synth

    return load_synth(a.checkpoint, vae=a.vae, tokenizer=a.tokenizer)


def _number_or_off(v: str):
    if v.lower() in ("off", "none"):
        return None
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {v!r}") from None


def _report(res: dict, quiet: bool) -> None:
    if not quiet and res.get("out") != "-":
        extra = f" ({res['seconds']:.2f} s)" if "seconds" in res else ""
        print(f"wrote {res['out']}{extra}", file=sys.stderr)


class _ModelDefault:
    """--eos-threshold left unset: the model's own threshold (argparse does not convert a
    default that is not a string, so the sentinel passes through as is)."""

    def __str__(self):
        return "the model's: -4 unless its config names one"


MODEL_DEFAULT = _ModelDefault()


def _eos(value, synth):
    return synth.eos_threshold if value is MODEL_DEFAULT else value


def _tts(a):
    from calm_fast.serve import commands

    text = sys.stdin.read() if a.text == "-" else a.text
    synth = _synth(a)
    if a.steps is not None:
        synth.head_steps = a.steps
    from calm_fast.serve.service import Job

    job = Job.speech(synth, text, voice=commands._voice(synth, a.voice), seed=a.seed,
                     temperature=synth.temperature if a.temperature is None else a.temperature,
                     cfg_scale=a.cfg, max_seconds=a.max_seconds,
                     eos_threshold=_eos(a.eos_threshold, synth))
    _report(commands.run_job(synth, job, a.output, a.format, a.speed, a.quiet, "speaking"),
            a.quiet)


def _continue(a):
    from calm_fast.serve import commands

    _report(commands.continue_audio(_synth(a), a.prompt, a.output, seconds=a.seconds,
                                    temperature=a.temperature, cfg=a.cfg, seed=a.seed,
                                    fmt=a.format, quiet=a.quiet), a.quiet)


def _music(a):
    from calm_fast.serve import commands
    from calm_fast.serve.models import load_synth

    synth = load_synth(a.checkpoint, vae=a.vae, tokenizer=a.tokenizer, music=True)
    _report(commands.music(synth, a.caption, a.output, seconds=a.seconds,
                           temperature=a.temperature, cfg=a.cfg, seed=a.seed, fmt=a.format,
                           quiet=a.quiet), a.quiet)


def _export_voice(a):
    from calm_fast.serve import commands

    if a.checkpoint is None and a.vae:  # only the VAE encodes a prompt
        from calm_fast.runtime.export import load_model
        from calm_fast.runtime.voices import encode_prompt, save_voice

        vae = load_model(a.vae, expect="vae")
        lat = encode_prompt(vae, a.audio, max_seconds=a.seconds)
        save_voice(a.out, lat, vae)
        res = {"out": a.out, "seconds": lat.shape[0] / vae.cfg.frame_rate}
    else:
        res = commands.export_voice(_synth(a), a.audio, a.out, seconds=a.seconds)
    _report(res, False)


def _eval(a):
    from pathlib import Path

    from calm_fast.evaluate.report import evaluate, table

    metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]
    if a.dnsmos and "dnsmos" not in metrics:
        metrics.append("dnsmos")
    rep = evaluate(a.source, metrics, model=a.model, threads=a.threads, limit=a.limit,
                   progress=not a.quiet)
    if a.json:
        out = Path(a.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(rep, indent=1))
        tmp.replace(out)
    print(table(rep))


def _voices(a):
    from calm_fast.serve import commands

    vs = commands.voices(a.dir)
    if a.json:
        print(json.dumps(vs, indent=1))
        return
    if not vs:
        print("no built-in voices found: pass a prompt audio file or an exported voice "
              "file to --voice (calm-fast export-voice AUDIO OUT.safetensors)")
    for v in vs:
        kind = "built-in" if v["builtin"] else v["path"]
        print(f"{v['name']}\t{v['frames']} frames\t{kind}")


def _serve(a):
    from calm_fast.serve.server import ServerConfig, serve

    synth = _synth(a)
    if a.steps is not None:
        synth.head_steps = a.steps
    cfg = ServerConfig(max_input_chars=a.max_input_chars, max_streams=a.max_streams,
                       max_queue=a.max_queue, queue_timeout=a.queue_timeout,
                       max_seconds=a.max_seconds, cache_mb=a.cache_mb,
                       decode_frames=a.decode_frames, sample_rate=a.sample_rate,
                       eos_threshold=_eos(a.eos_threshold, synth),
                       default_voice=a.default_voice,
                       voices_dir=a.voices_dir, precision=checks.precision(a.precision, a.int8),
                       max_upload_mb=a.max_upload_mb, overlap=not a.no_overlap)
    print(f"calm-fast: serving {synth.name} on http://{a.host}:{a.port}/ "
          f"(max {a.max_streams} streams)", file=sys.stderr)
    serve(synth, a.host, a.port, cfg, log_level=a.log_level)


def _model_flags(p):
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", default=None, metavar="PATH|NAME",
                   help="the model: a calm_fast LM export (with --vae), a folder holding "
                        "lm.safetensors + vae.safetensors, a Pocket TTS model file, or a "
                        "pocket-tts config name in the local Hugging Face cache, or a shipped "
                        "model by name: 'default' (speech) or 'music'; default: the shipped "
                        "speech model (the music model for `music`)")
    g.add_argument("--vae", default=None, metavar="VAE.safetensors",
                   help="the VAE export of a calm_fast LM (default: vae.safetensors beside it)")
    g.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="tokenizer of a Pocket TTS model file (.model or .json; default: "
                        "tokenizer.model/.json beside it)")


def _gen_flags(p, seconds: float | None = None):
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file (format from its suffix), or - for stdout")
    p.add_argument("--format", default=None, choices=("wav", "pcm", "mp3", "opus", "aac",
                                                      "flac"),
                   help="output format (default: from the output suffix; wav for stdout)")
    if seconds is not None:
        p.add_argument("--seconds", type=float, default=seconds,
                       help="seconds of audio to make")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the model's, 0.7 for calm_fast "
                        "exports)")
    p.add_argument("--cfg", type=float, default=1.0,
                   help="latent classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="random seed (chunk i uses seed + i)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    _model_flags(p)


def _add_doors(sub):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    t = sub.add_parser("tts", help="text to speech", formatter_class=fmt,
                       description="Speak TEXT. Long text is split into sentences and "
                       "streamed; [pause:1.5s] and SSML <break time=\"500ms\"/> insert "
                       "silence.")
    t.add_argument("text", help="the text, or - to read it from stdin")
    t.add_argument("--voice", default=None,
                   help="a built-in voice name, a prompt audio file (wav/flac/mp3) or a voice "
                        "file from export-voice (default: no voice prompt)")
    t.add_argument("--steps", type=int, default=None,
                   help="head decoding steps per frame (default: the model's)")
    t.add_argument("--speed", type=float, default=1.0,
                   help="speaking rate, 0.25 to 4 (pitch kept)")
    t.add_argument("--max-seconds", type=float, default=30.0,
                   help="most audio per sentence chunk")
    t.add_argument("--eos-threshold", type=_number_or_off, default=MODEL_DEFAULT,
                   help="end-of-speech logit threshold, or 'off' to always make --max-seconds")
    _gen_flags(t)
    t.set_defaults(fn=_tts)
    c = sub.add_parser("continue", help="continue an audio prompt", formatter_class=fmt,
                       description="Make --seconds of audio that continue PROMPT (the "
                                   "continuation only is written). Speech by default; "
                                   "--checkpoint music continues music.")
    c.add_argument("prompt", help="prompt audio file (its first 10 s are used)")
    _gen_flags(c, seconds=5.0)
    c.set_defaults(fn=_continue)
    m = sub.add_parser("music", help="music from a caption", formatter_class=fmt,
                       description="Music from CAPTION, read for the tags of the shipped "
                                   "music model: key ('in D minor'), tempo ('96 BPM', slow, "
                                   "fast), style ('Bach chorale', 'fiddle tune', "
                                   "'accompaniment') and instruments ('for violin and cello').")
    m.add_argument("caption")
    _gen_flags(m, seconds=10.0)
    m.set_defaults(fn=_music)
    e = sub.add_parser("export-voice", help="encode a voice prompt once into a voice file",
                       formatter_class=fmt)
    e.add_argument("audio", help="prompt audio file")
    e.add_argument("out", help="the voice file to write (.safetensors)")
    e.add_argument("--seconds", type=float, default=10.0, help="prompt seconds kept")
    _model_flags(e)
    e.set_defaults(fn=_export_voice)
    v = sub.add_parser("voices", help="list the built-in voices", formatter_class=fmt)
    v.add_argument("--dir", action="append", default=[],
                   help="also list the voice files of this folder")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(fn=_voices)
    s = sub.add_parser("serve", help="OpenAI-compatible streaming TTS server",
                       formatter_class=fmt,
                       description="One engine batches every client frame by frame. Routes: "
                       "POST /v1/audio/speech, POST /tts, GET|POST /v1/audio/voices, GET "
                       "/health, GET /metrics, GET / (a page).")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--max-streams", type=int, default=16, help="requests generating at once")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond those (more: 429)")
    s.add_argument("--queue-timeout", type=float, default=30.0,
                   help="seconds a request may wait for its first audio (then 503)")
    s.add_argument("--max-input-chars", type=int, default=4096,
                   help="longest input text (longer: 413)")
    s.add_argument("--max-upload-mb", type=float, default=20.0, help="largest voice upload")
    s.add_argument("--max-seconds", type=float, default=30.0, help="most audio per sentence")
    s.add_argument("--cache-mb", type=float, default=256.0, help="KV-cache budget")
    s.add_argument("--decode-frames", type=int, default=8,
                   help="frames per audio chunk, at most (chunks grow 1, 2, 4...)")
    s.add_argument("--sample-rate", type=int, default=None,
                   help="output sample rate (default: the model's)")
    s.add_argument("--eos-threshold", type=_number_or_off, default=MODEL_DEFAULT,
                   help="end-of-speech logit threshold, or 'off'")
    s.add_argument("--steps", type=int, default=None,
                   help="head decoding steps per frame (default: the model's)")
    s.add_argument("--default-voice", default=None, help="voice name used when none is given")
    s.add_argument("--voices-dir", default=None,
                   help="keep uploaded voices in this folder (default: memory only)")
    s.add_argument("--precision", choices=checks.PRECISIONS, default="fp32",
                   help="weights of the LM and its head: fp32 (default), bf16 (half the "
                   "bytes; bf16 rows, fp32 sums) or int8 (CPU)")
    s.add_argument("--int8", action="store_true",
                   help="the same as --precision int8 (default: off)")
    s.add_argument("--no-overlap", action="store_true",
                   help="decode on the engine thread, after each frame step (default: on a "
                   "thread and core of its own, while the next frames are made)")
    s.add_argument("--log-level", default="info", help="uvicorn log level")
    _model_flags(s)
    s.set_defaults(fn=_serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="calm-fast", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_doors(sub)
    data = sub.add_parser("data", help="build offline datasets").add_subparsers(
        dest="what", required=True)
    sp = data.add_parser("speech", help="multi-speaker TTS speech from Debian engines")
    sp.add_argument("out")
    sp.add_argument("--n", type=int, default=200)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--hours", type=float, default=None,
                    help="make about this many hours of train audio instead of --n draws "
                         "(default: use --n)")
    sp.add_argument("--pseudo", type=int, default=2, help="pseudo-speakers per base voice")
    sp.add_argument("--held-out", type=float, default=0.2,
                    help="share of the voices held out for the cloning tests")
    sp.add_argument("--eval", type=int, default=0,
                    help="fixed evaluation sentences per held-out voice and the default voice")
    sp.add_argument("--eval-all-base", action="store_true",
                    help="give every seen base voice the evaluation sentences too")
    sp.add_argument("--wer-threshold", type=_number_or_off, default=0.3,
                    help="drop base voices whose whisper WER is above this, or 'off'")
    sp.add_argument("--workers", type=int, default=2)
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(fn=_data_speech)
    mu = data.add_parser("music", help="captioned music from music21 scores and MMA styles")
    mu.add_argument("out")
    mu.add_argument("--n", type=int, default=50)
    mu.add_argument("--seed", type=int, default=0)
    mu.add_argument("--seconds", type=float, default=30.0)
    mu.add_argument("--mma", type=float, default=0.25, help="fraction of MMA renders")
    mu.add_argument("--workers", type=int, default=2)
    mu.set_defaults(fn=_data_music)
    la = data.add_parser("latents", help="encode a manifest once with a trained VAE")
    la.add_argument("manifest")
    la.add_argument("vae", help="a VAE exported by `calm-fast train vae`")
    la.add_argument("out")
    la.add_argument("--force", action="store_true", help="replace a cache already in OUT")
    la.set_defaults(fn=_data_latents)
    al = data.add_parser("align", help="phoneme durations of a latent cache (for aligned-text "
                                       "TTS models), learnt from its audio")
    al.add_argument("latents", help="a latent cache made by `calm-fast data latents`")
    al.add_argument("manifest", help="the manifest the cache was made from (its audio)")
    al.add_argument("--steps", type=int, default=600, help="aligner training steps")
    al.add_argument("--seed", type=int, default=0)
    al.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    al.set_defaults(fn=_data_align)
    tr = sub.add_parser("train", help="run a training recipe (TOML file)")
    tr.add_argument("kind", choices=("vae", "lm", "distill"))
    tr.add_argument("recipe")
    tr.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a recipe value (TOML syntax), e.g. train.steps=10")
    tr.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    tr.add_argument("--force", action="store_true",
                    help="resume an out_dir whose run was made with other settings")
    tr.set_defaults(fn=_train)
    sub.add_parser("info", help="versions and available fast paths").set_defaults(fn=_info)
    ev = sub.add_parser("eval", help="score generated audio: WER/CER, speaker similarity, "
                        "round-trip and music metrics", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="Score a manifest (JSONL: path, text, prompt, speaker, "
                        "reference, delay, caption, kind, group) or a folder of audio files "
                        "(texts from .txt files beside them). Offline: whisper tiny.en, "
                        "resemblyzer, pystoi, pesq, librosa, speechmos.")
    ev.add_argument("source", help="manifest .jsonl or folder of audio files")
    ev.add_argument("--metrics", default="wer,sim,signal,music",
                    help="comma list of wer, sim, signal, music, dnsmos")
    ev.add_argument("--dnsmos", action="store_true",
                    help="add DNSMOS (slow: ~1.4x real time; default: off)")
    ev.add_argument("--json", default=None, metavar="OUT.json",
                    help="write the full report here (default: print the table only)")
    ev.add_argument("--model", default="",
                    help="model name recorded in the report (default: the rows' 'model')")
    ev.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    ev.add_argument("--limit", type=int, default=0,
                    help="score only the first N rows (0: all)")
    ev.add_argument("-q", "--quiet", action="store_true",
                    help="no progress bar (default: a bar on stderr)")
    ev.set_defaults(fn=_eval)
    # `batch` (a manifest job, resumable; --ray): its options live beside the job
    from calm_fast.serve import batch

    batch.register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, RuntimeError, OSError, KeyError) as e:  # one clear line, exit 1
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"calm-fast: error: {msg.splitlines()[0] if msg else type(e).__name__}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("calm-fast: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
