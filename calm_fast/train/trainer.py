"""A small, exact trainer: AdamW, warm-up + cosine/constant LR, clipping, EMA, accumulation,
mixed precision on GPU, JSONL metrics, atomic safetensors checkpoints, exact resume, and
data parallelism under torchrun (gloo on CPU, NCCL on GPU).

Exactness: the batch of step k comes from ``batch_fn(step, micro, rank, world)`` and every
step reseeds the global RNGs from (seed, step, rank), so a run resumed from the checkpoint
of step k replays steps k+1.. bit for bit like an uninterrupted run.

    trainer = Trainer(model, loss_fn, batch_fn, TrainConfig(steps=1000, out_dir="runs/x"))
    trainer.run()            # resumes from runs/x/last.safetensors if it exists

``loss_fn(model, batch) -> (loss, {name: float})``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from calm_fast.train.checkpoint import load_checkpoint, save_checkpoint


@dataclass
class TrainConfig:
    out_dir: str
    steps: int
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.95)
    warmup: int = 0
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    ema_decay: float | None = 0.999
    accum: int = 1
    amp: str | None = None  # "bf16" or "fp16", CUDA only
    log_every: int = 10
    ckpt_every: int = 100
    sample_every: int = 0
    seed: int = 0
    progress: bool = True
    # Stop after this step (a checkpoint is written) as if killed, with the schedule of the
    # full run: time-boxed jobs resume later with the same result. 0 = run to ``steps``.
    stop_after: int = 0

    def __post_init__(self):
        if self.steps <= 0 or self.accum <= 0:
            raise ValueError(f"steps and accum must be positive, got {self.steps}, {self.accum}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """LR for 0-based ``step``: linear warm-up over ``warmup`` steps, then constant or cosine."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun; (rank, world)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return _dist_info()


def shutdown_distributed() -> None:
    """Leave the process group cleanly (all ranks meet first). Without it, gloo's threads
    can abort the interpreter at exit ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class Trainer:
    def __init__(self, model: torch.nn.Module, loss_fn, batch_fn, cfg: TrainConfig,
                 sample_fn=None, params=None, find_unused: bool = False):
        self.cfg = cfg
        self.rank, self.world = init_distributed()
        self.model = model
        self.loss_fn, self.batch_fn, self.sample_fn = loss_fn, batch_fn, sample_fn
        params = [p for p in (params if params is not None else model.parameters())
                  if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay)
        self.ema = None
        if cfg.ema_decay is not None:
            self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.ddp = model
        if self.world > 1:
            # find_unused: models whose optional inputs (a dropped voice prompt) leave some
            # parameters without a gradient in a step.
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=find_unused)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        self.out = Path(cfg.out_dir)
        self.step = 0
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out / "last.safetensors"

    def save(self) -> None:
        if self.rank == 0:
            save_checkpoint(self.ckpt_path, model=self.model, ema=self.ema, step=self.step,
                            optimizer=self.optimizer, meta={"config": asdict(self.cfg)})
        if self.world > 1:
            dist.barrier()

    def maybe_resume(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        info = load_checkpoint(self.ckpt_path, model=self.model, ema=self.ema,
                               optimizer=self.optimizer)
        self.step = info["step"]
        return True

    def _trim_metrics(self) -> None:
        """Drop the metrics rows logged after the checkpoint a resume starts from (the
        resumed run logs those steps again)."""
        f = self.out / "metrics.jsonl"
        if not f.is_file():
            return
        keep = []
        for line in f.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
        tmp = f.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        tmp.replace(f)

    # -- one optimisation step ------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.amp and torch.cuda.is_available():
            dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return torch.autocast("cpu", enabled=False)

    def train_step(self) -> dict:
        cfg = self.cfg
        # Per-step seeding makes the noise of step k independent of where the run started.
        seed_everything(cfg.seed * 1_000_003 + self.step * 7919 + self.rank)
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(cfg, self.step)
        self.ddp.train()
        metrics: dict[str, float] = {}
        total = 0.0
        for micro in range(cfg.accum):
            batch = self.batch_fn(self.step, micro, self.rank, self.world)
            last = micro == cfg.accum - 1
            sync = self.ddp.no_sync() if (self.world > 1 and not last) else _null()
            with sync, self._autocast():
                loss, m = self.loss_fn(self.ddp, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {self.step}")
            scaled = loss / cfg.accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.item() / cfg.accum
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / cfg.accum
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        gnorm = torch.nn.utils.clip_grad_norm_(
            params, cfg.grad_clip if cfg.grad_clip else float("inf")).item()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                ema_p = [p for p in self.ema.state_dict().values() if p.is_floating_point()]
                cur_p = [p for p in self.model.state_dict().values() if p.is_floating_point()]
                torch._foreach_lerp_(ema_p, cur_p, 1 - cfg.ema_decay)
        self.step += 1
        return {"loss": total, "grad_norm": gnorm, "lr": lr_at(cfg, self.step - 1), **metrics}

    # -- the loop --------------------------------------------------------------------------------
    def run(self, resume: bool = True) -> dict:
        cfg = self.cfg
        if resume and self.maybe_resume() and self.rank == 0:
            self._trim_metrics()
        log = open(self.out / "metrics.jsonl", "a") if self.rank == 0 else None
        t0, s0, m = time.perf_counter(), self.step, {}
        try:
            end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
            while self.step < end:
                m = self.train_step()
                if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    rate = (self.step - s0) / max(time.perf_counter() - t0, 1e-9)
                    row = {"step": self.step, **m, "steps_per_s": rate}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    if cfg.progress:
                        print(f"\rstep {self.step}/{cfg.steps}  loss {m['loss']:.4f}  "
                              f"lr {m['lr']:.2e}  {rate:.2f} it/s", end="", file=sys.stderr)
                if self.step % cfg.ckpt_every == 0 or self.step == end:
                    self.save()
                if (self.sample_fn and cfg.sample_every and self.step % cfg.sample_every == 0
                        and self.rank == 0):
                    self.sample_fn(self.ema or self.model, self.step, self.out)
        finally:
            if log:
                log.close()
            if cfg.progress and self.rank == 0:
                print(file=sys.stderr)
        return m


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
