"""Measure the shipped music models against the targets of issue 15, on held-out works.

The test split of `calm-fast data music` holds works never trained on (split by work).
One `calm-fast batch` job makes, from those files' captions and audio, text-to-music and
continuations; one `calm-fast eval` manifest scores everything, in groups:

    gt_music     the test renders (their estimated key against the caption's: the ceiling
                 of any key agreement measured this way)
    vae_music    their VAE round trip (reference = the render): chroma correlation
    t2m          text-to-music from each caption (--seeds clips per caption, --seconds s)
    continue     --seconds s continuing the first --prompt-seconds s of each render

    python scripts/eval_music.py --data data/music --out runs/eval_music [--model DIR]
        [--seeds 2] [--seconds 10] [--cfg 1.0] [--temperature 0.7]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/music")
    ap.add_argument("--out", default="runs/eval_music")
    ap.add_argument("--model", default=None, help="bundle folder (default: the shipped one)")
    ap.add_argument("--n", type=int, default=100, help="most test renders used")
    ap.add_argument("--seeds", type=int, default=2, help="text-to-music clips per caption")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--prompt-seconds", type=float, default=5.0)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--cfg", type=float, default=1.0, help="latent CFG scale (1 = off)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from calm_fast.codec.audio import load_audio, write_audio
    from calm_fast.evaluate.report import evaluate, table
    from calm_fast.runtime.export import load_model
    from calm_fast.serve.batch import run_batch
    from calm_fast.serve.models import MUSIC_BUNDLE

    data, out = Path(a.data).resolve(), Path(a.out).resolve()
    bundle = Path(a.model) if a.model else MUSIC_BUNDLE
    lm_p, vae_p = bundle / "lm.safetensors", bundle / "vae.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in (data / "manifest.jsonl").read_text().splitlines() if x]
    test = sorted((r for r in rows if r["split"] == "test"), key=lambda r: r["path"])[:a.n]
    if not test:
        sys.exit(f"{data}: no test-split renders")
    vae = load_model(vae_p, expect="vae")
    sr = vae.cfg.sample_rate

    prompts = out / "prompts"
    prompts.mkdir(exist_ok=True)
    jobs = []
    for i, r in enumerate(test):
        for s in range(a.seeds):
            jobs.append({"id": f"t2m_{i:03d}_{s}", "caption": r["caption"], "seed": s,
                         "max_seconds": a.seconds})
        p = prompts / f"{i:03d}.wav"
        if not p.exists():
            wav = load_audio(data / r["path"], sr)[..., :int(a.prompt_seconds * sr)]
            write_audio(p, wav, sr, peak=1.0)
        jobs.append({"id": f"cont_{i:03d}", "prompt": str(p), "max_seconds": a.seconds})
    man = out / "batch.jsonl"
    man.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    if (out / "audio").exists():  # a new model or new settings: make every row again
        import shutil
        shutil.rmtree(out / "audio")
    s = run_batch(man, out / "audio", checkpoint=lm_p, vae=vae_p, max_seconds=a.seconds,
                  temperature=a.temperature, cfg=a.cfg, eos_threshold=None, progress=True)
    print(f"batch: {s}", file=sys.stderr)
    done = {}
    for line in (out / "audio" / "results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("status") == "ok":
            done[rec["id"]] = str((out / "audio" / rec["output"]).resolve())

    rt_dir = out / "vae"
    rt_dir.mkdir(exist_ok=True)
    delay = int(getattr(vae.cfg, "delay", 0))
    ev = []
    for i, r in enumerate(test):
        gt = str(data / r["path"])
        dst = rt_dir / f"{i:03d}.wav"
        if not dst.exists():
            wav = load_audio(gt, sr)
            with torch.no_grad():
                y = vae.decode(vae.encode(vae.pad(wav[None])))[0]
            write_audio(dst, y, sr, peak=1.0)
        cap = r["caption"]
        ev.append({"path": gt, "caption": cap, "kind": "music", "group": "gt_music"})
        ev.append({"path": str(dst), "caption": cap, "reference": gt, "delay": delay,
                   "kind": "music", "group": "vae_music"})
        for s in range(a.seeds):
            if f"t2m_{i:03d}_{s}" in done:
                ev.append({"path": done[f"t2m_{i:03d}_{s}"], "caption": cap, "kind": "music",
                           "group": "t2m"})
        if f"cont_{i:03d}" in done:
            ev.append({"path": done[f"cont_{i:03d}"], "caption": cap, "kind": "music",
                       "group": "continue"})
    man_p = out / "eval.jsonl"
    man_p.write_text("".join(json.dumps(e) + "\n" for e in ev))
    rep = evaluate(man_p, model=str(bundle), threads=a.threads, metrics=("signal", "music"))
    rep["sampling"] = {"temperature": a.temperature, "cfg": a.cfg, "seeds": a.seeds,
                       "seconds": a.seconds}
    (out / "report.json").write_text(json.dumps(rep, indent=1))
    print(table(rep))


if __name__ == "__main__":
    main()
