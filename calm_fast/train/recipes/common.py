"""What every recipe does the same way: per-batch generators and train-then-export."""
from __future__ import annotations

from pathlib import Path

import torch

from calm_fast.runtime.export import export_model
from calm_fast.train.trainer import Trainer, shutdown_distributed


def batch_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator of one micro-batch of one rank: a pure function of (seed, step, micro,
    rank), so a resumed run draws the batches an uninterrupted one would."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 64 + micro) * 64 + rank)


def train_and_export(module, loss_fn, batch_fn, cfg, path, pick, extra: dict, **trainer_kw):
    """Run (or resume) the Trainer, then export ``pick(EMA or module)`` to ``path`` (rank 0)."""
    trainer = Trainer(module, loss_fn, batch_fn, cfg, **trainer_kw)
    trainer.run()
    path = Path(path)
    if trainer.rank == 0:
        export_model(path, pick(trainer.ema or module), extra={**extra, "step": trainer.step})
    shutdown_distributed()
    return path
