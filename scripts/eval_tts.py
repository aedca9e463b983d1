"""Measure the shipped speech models against the targets of issue 15, on held-out data.

Builds one `calm-fast batch` manifest (TTS in the default voice with the 1-step head and a
many-step head; zero-shot cloning from held-out voices), runs it, writes the VAE round
trips of the same ground-truth files, and scores everything in one `calm-fast eval`
manifest whose groups are:

    gt_default     the dataset audio of the eval sentences in the default voice
    vae_default    its VAE round trip (reference = that audio, delay = the codec's)
    tts_default    TTS of the same sentences, default voice, 1 head step
    tts_default_s8 the same with 8 head steps (the many-step teacher of the 1-step head)
    gt_clone       held-out voices' audio of their sentences (prompt: another sentence)
    vae_clone      its VAE round trip
    tts_clone      TTS of those sentences cloned from that 3-10 s prompt

    python scripts/eval_tts.py --data data/speech --out runs/eval_tts [--model DIR] [--n 56]
        [--temperature 0.7] [--cfg 1.0] [--sets default,s8,clone]

``--temperature`` and ``--cfg`` (latent CFG scale, 1 = off) are the sampling settings of
every TTS row; ``--sets`` makes only some TTS groups (a quick sweep over settings).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def load_rows(data: Path) -> list[dict]:
    return [json.loads(x) for x in (data / "manifest.jsonl").read_text().splitlines() if x]


def eval_sets(rows, n: int, default_voice: str):
    """(default-voice rows, [(held-out row, its prompt row)]) of the shared eval sentences."""
    held = sorted({r["speaker_id"] for r in rows if r["split"] == "test_voice"})
    by_spk = {s: sorted((r for r in rows if r["split"] == "test_voice" and r["speaker_id"] == s),
                        key=lambda r: r["path"]) for s in held}
    texts = [r["text"] for r in by_spk[held[0]]]
    default = {r["text"]: r for r in rows if r["split"] == "test"
               and r["speaker_id"] == default_voice}
    dflt = [default[t] for t in texts if t in default][:n]
    per = max(1, -(-n // len(held)))
    clone = []
    for k, s in enumerate(held):
        utts = by_spk[s]
        prompts = [r for r in utts if 3.0 <= r["duration"] <= 10.0]
        for j in range(k * per, (k + 1) * per):
            row = utts[j % len(utts)]
            p = next(p for p in prompts[(j * 7) % len(prompts):] + prompts if p["text"] != row["text"])
            clone.append((row, p))
    return dflt, clone[:n]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/speech")
    ap.add_argument("--out", default="runs/eval_tts")
    ap.add_argument("--model", default=None, help="bundle folder (default: the shipped one)")
    ap.add_argument("--n", type=int, default=56)
    ap.add_argument("--default-speaker", default="festival-slt_hts")
    ap.add_argument("--default-voice", default="slt", help="built-in voice of that speaker")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.7, help="Gaussian temperature")
    ap.add_argument("--cfg", type=float, default=1.0, help="latent CFG scale (1 = off)")
    ap.add_argument("--sets", default="default,s8,clone",
                    help="TTS groups to make: some of default, s8, clone")
    ap.add_argument("--only-ref", action="store_true",
                    help="score the ground truth and VAE round trips only (no LM needed)")
    a = ap.parse_args(argv)
    sets = set(a.sets.split(","))
    if not sets or not sets <= {"default", "s8", "clone"}:
        ap.error(f"--sets: some of default, s8, clone, got {a.sets!r}")
    torch.set_num_threads(a.threads)

    from calm_fast.codec.audio import write_audio
    from calm_fast.evaluate.report import evaluate, table
    from calm_fast.runtime.export import load_model
    from calm_fast.serve.batch import run_batch
    from calm_fast.serve.models import DEFAULT_BUNDLE

    data, out = Path(a.data).resolve(), Path(a.out).resolve()  # manifests hold paths
    bundle = Path(a.model) if a.model else DEFAULT_BUNDLE
    lm_p, vae_p = bundle / "lm.safetensors", bundle / "vae.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(data)
    dflt, clone = eval_sets(rows, a.n, a.default_speaker)

    jobs = []
    for i, r in enumerate(dflt if not a.only_ref else []):
        if "default" in sets:
            jobs.append({"id": f"default_{i:03d}", "text": r["text"], "voice": a.default_voice})
        if "s8" in sets:
            jobs.append({"id": f"default_s8_{i:03d}", "text": r["text"],
                         "voice": a.default_voice, "steps": 8})
    for i, (r, p) in enumerate(clone if not a.only_ref and "clone" in sets else []):
        jobs.append({"id": f"clone_{i:03d}", "text": r["text"], "voice": str(data / p["path"])})
    done = {}
    if jobs:
        man = out / "batch.jsonl"
        man.write_text("".join(json.dumps(j) + "\n" for j in jobs))
        if (out / "audio").exists():  # a new model: make every row again
            import shutil
            shutil.rmtree(out / "audio")
        s = run_batch(man, out / "audio", checkpoint=lm_p, vae=vae_p, seed=a.seed,
                      max_seconds=20.0, temperature=a.temperature, cfg=a.cfg,
                      progress=True)
        print(f"batch: {s}", file=sys.stderr)
    for line in ((out / "audio" / "results.jsonl").read_text().splitlines() if jobs else []):
        rec = json.loads(line)
        if rec.get("status") == "ok":
            done[rec["id"]] = rec
    print(f"{len(done)} of {len(jobs)} rows made audio", file=sys.stderr)

    vae = load_model(vae_p, expect="vae")
    rt_dir = out / "vae"
    rt_dir.mkdir(exist_ok=True)

    def round_trip(r) -> str:
        from calm_fast.codec.audio import load_audio

        dst = rt_dir / (r["path"].replace("/", "__").rsplit(".", 1)[0] + ".wav")
        if not dst.exists():
            wav = load_audio(data / r["path"], vae.cfg.sample_rate)
            with torch.no_grad():
                y = vae.decode(vae.encode(vae.pad(wav[None])))[0]
            write_audio(dst, y, vae.cfg.sample_rate, peak=1.0)
        return str(dst)

    delay = int(getattr(vae.cfg, "delay", 0))
    ev = []
    for i, r in enumerate(dflt):
        gt = str(data / r["path"])
        ev.append({"path": gt, "text": r["text"], "group": "gt_default"})
        ev.append({"path": round_trip(r), "text": r["text"], "reference": gt, "delay": delay,
                   "group": "vae_default"})
        for key, group in ((f"default_{i:03d}", "tts_default"),
                           (f"default_s8_{i:03d}", "tts_default_s8")):
            if key in done:
                ev.append({"path": str((out / "audio" / done[key]["output"]).resolve()),
                           "text": r["text"], "group": group})
    for i, (r, p) in enumerate(clone):
        gt, prompt = str(data / r["path"]), str(data / p["path"])
        spk = r["speaker_id"]
        ev.append({"path": gt, "text": r["text"], "prompt": prompt, "speaker": spk,
                   "group": "gt_clone"})
        ev.append({"path": round_trip(r), "text": r["text"], "reference": gt, "delay": delay,
                   "group": "vae_clone"})
        if f"clone_{i:03d}" in done:
            ev.append({"path": str((out / "audio" / done[f"clone_{i:03d}"]["output"]).resolve()),
                       "text": r["text"], "prompt": prompt, "speaker": spk,
                       "group": "tts_clone"})
    # The ground truth and round trips do not depend on the LM: scored once and kept
    # (report_ref.json) while the same files are asked for; the TTS rows every time.
    ref = [e for e in ev if not e["group"].startswith("tts_")]
    tts = [e for e in ev if e["group"].startswith("tts_")]
    reports = []
    for name, part in (("ref", ref), ("tts", tts)):
        if not part or a.only_ref and name == "tts":
            continue
        man_p, rep_p = out / f"eval_{name}.jsonl", out / f"report_{name}.json"
        text = "".join(json.dumps(e) + "\n" for e in part)
        if name == "ref" and rep_p.exists() and man_p.exists() and man_p.read_text() == text:
            reports.append(json.loads(rep_p.read_text()))
            continue
        man_p.write_text(text)
        rep = evaluate(man_p, model=str(bundle), threads=a.threads)
        rep_p.write_text(json.dumps(rep, indent=1))
        reports.append(rep)
    merged = dict(reports[-1])
    merged["groups"] = {g: v for r in reports for g, v in r["groups"].items()}
    merged["rows"] = [row for r in reports for row in r["rows"]]
    merged["source"] = str(out)
    merged["sampling"] = {"temperature": a.temperature, "cfg": a.cfg, "seed": a.seed}
    (out / "report.json").write_text(json.dumps(merged, indent=1))
    print(table(merged))

if __name__ == "__main__":
    main()
