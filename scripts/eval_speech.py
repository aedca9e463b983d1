"""Intelligibility of a trained speech pipeline, by whisper tiny.en WER on held-out sentences.

    python scripts/eval_speech.py --data data/speech --vae runs/speech_vae/vae.safetensors \
        --lm runs/speech_lm/model.safetensors [--lm runs/speech_student/model.safetensors] \
        --split test --n 24 --out runs/eval_speech.json

Three rungs for the same sentences: the dataset audio itself, its VAE round trip (the
ceiling the LM can reach through this codec), and TTS from each LM (text + a voice prompt
cut from another training utterance of the same speaker).
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from calm_fast.codec.audio import load_audio
from calm_fast.evaluate import WhisperASR, wer
from calm_fast.runtime.export import load_model
from calm_fast.runtime.tts import TTS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset dir with manifest.jsonl")
    p.add_argument("--vae", required=True)
    p.add_argument("--lm", action="append", default=[],
                   help="an LM export, optionally @CFG_SCALE (repeatable): "
                        "runs/lm/model.safetensors@1.5")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="")
    p.add_argument("--save-audio", default="", help="directory for the generated audio")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    root = Path(a.data)
    rows = [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]
    train = {}
    for r in rows:
        if r["split"] == "train":
            train.setdefault(r["speaker_id"], []).append(r)
    pool = [r for r in rows if r["split"] == a.split and r["speaker_id"] in train]
    rng = random.Random(0)
    rng.shuffle(pool)
    pool = pool[:a.n]
    if not pool:
        sys.exit(f"no {a.split} utterance with a training speaker in {root}")
    vae = load_model(a.vae, expect="vae")
    sr = vae.cfg.sample_rate
    asr = WhisperASR(a.threads)
    refs = [r["text"] for r in pool]
    audio = {"dataset": [load_audio(root / r["path"], sr) for r in pool]}
    with torch.no_grad():
        audio["vae round trip"] = [vae.decode(vae.encode(vae.pad(w[None])))[0, :, :w.shape[1]]
                                   for w in audio["dataset"]]
    voices = [load_audio(root / rng.choice(train[r["speaker_id"]])["path"], sr) for r in pool]
    timing = {}
    for spec in a.lm:
        path, _, cfg = spec.partition("@")
        cfg = float(cfg) if cfg else a.cfg_scale
        tts = TTS(load_model(path, expect="calm"), vae)
        name = f"tts {Path(path).parent.name} cfg {cfg:g}"
        t0 = time.perf_counter()
        audio[name] = [tts.synthesize([r["text"]], voice=v, seed=i, cfg_scale=cfg,
                                      temperature=a.temperature, max_seconds=15)[0][None]
                       for i, (r, v) in enumerate(zip(pool, voices))]
        secs = sum(x.shape[-1] for x in audio[name]) / sr
        timing[name] = {"audio_s": secs, "wall_s": time.perf_counter() - t0}
    results = {}
    for name, wavs in audio.items():
        hyps = [asr.transcribe(w, sr) for w in wavs]
        results[name] = {"wer": wer(refs, hyps), "seconds": sum(w.shape[-1] for w in wavs) / sr,
                         "examples": [{"ref": r, "hyp": h} for r, h in zip(refs[:4], hyps[:4])],
                         **timing.get(name, {})}
        if a.save_audio:
            from calm_fast.codec.audio import write_audio
            d = Path(a.save_audio) / name.replace(" ", "_")
            for i, w in enumerate(wavs[:8]):
                write_audio(d / f"{i:02d}.flac", w.reshape(1, -1), sr)
    print(f"{'audio':<28} {'WER':>6} {'seconds':>8}")
    for name, r in results.items():
        print(f"{name:<28} {r['wer']:6.3f} {r['seconds']:8.1f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"split": a.split, "n": len(pool), "results": results},
                                          indent=1))
    return results


if __name__ == "__main__":
    main()
