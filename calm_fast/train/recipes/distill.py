"""Recipe ``distill``: latent distillation of a trained CALM into a smaller backbone.

    [student]   teacher = "runs/lm/model.safetensors", layers = [0, 3] (teacher layers that
                seed the student's, in order), cfg_scale = 1.5
    [data]      as the lm recipe (the teacher's tokenizer is used)

The student regresses the teacher's CFG-combined output Z_null + a (Z_cond - Z_null) (paper
§3, Pocket TTS): it sees only the conditioned prefix, so one forward replaces the teacher's
two at generation time. The student starts as a copy of the teacher (embeddings, conditioner,
norms, short context) with the chosen backbone layers; the head and the EOS head are copied
and frozen, so the student's Z must land where the teacher's head expects it. The student is
exported to ``out_dir/model.safetensors`` (EMA weights).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from calm_fast.runtime.export import load_model
from calm_fast.model.calm import CALM
from calm_fast.train.objectives import latent_distillation_loss
from calm_fast.train.trainer import TrainConfig
from calm_fast.train.recipes.common import batch_generator, train_and_export
from calm_fast.train.recipes.config import RecipeError, build
from calm_fast.train.recipes.lm import (LMData, LMObjective, Utterances, frame_mask, prefix_batch)

FROZEN = ("flow_net.", "out_eos.")


@dataclass(frozen=True)
class StudentSpec:
    teacher: str
    layers: tuple[int, ...] = (0,)
    cfg_scale: float = 1.5


def make_student(teacher: CALM, layers) -> CALM:
    """A CALM with ``len(layers)`` backbone layers, seeded from the teacher: layer i is a copy
    of teacher layer ``layers[i]``, everything else a copy of the teacher's; head and EOS head
    frozen. VP noise is off: the student must match Z on clean inputs, as at generation."""
    n = teacher.cfg.backbone.num_layers
    if not layers or any(not 0 <= i < n for i in layers):
        raise RecipeError(f"student.layers must name teacher layers in [0, {n}), got "
                          f"{list(layers)}")
    cfg = replace(teacher.cfg, backbone=replace(teacher.cfg.backbone, num_layers=len(layers)),
                  vp_noise=False)
    tok = teacher.conditioner.tokenizer if hasattr(teacher, "conditioner") else None
    student = CALM(cfg, tok)
    sd = {}
    for k, v in teacher.state_dict().items():
        if k.startswith("transformer.layers."):
            idx, rest = k[len("transformer.layers."):].split(".", 1)
            for i, src in enumerate(layers):
                if int(idx) == src:
                    sd[f"transformer.layers.{i}.{rest}"] = v.clone()
        else:
            sd[k] = v.clone()
    student.load_state_dict(sd, strict=True)
    for name, p in student.named_parameters():
        p.requires_grad_(not name.startswith(FROZEN))
    return student


class DistillTraining(nn.Module):
    """The student; ``forward(batch, z_target)`` returns (loss, logs)."""

    def __init__(self, student: CALM):
        super().__init__()
        self.calm = student

    def forward(self, batch, z_cond, z_null, alpha):
        m = self.calm
        prefix, mask = prefix_batch(m, batch["tokens"], batch["voices"])
        z, _ = m(m.normalize(batch["latents"]), prefix, mask)
        valid = frame_mask(batch["lengths"], z.shape[1], include_end=True)
        loss = latent_distillation_loss(z, z_cond, z_null, alpha, valid)
        return loss, {"distill": loss.detach()}


@torch.no_grad()
def teacher_targets(teacher: CALM, batch):
    """(Z_cond, Z_null) of the teacher on clean inputs: the full prefix, and the null one."""
    latents = teacher.normalize(batch["latents"])
    prefix, mask = prefix_batch(teacher, batch["tokens"], batch["voices"])
    z_cond, _ = teacher(latents, prefix, mask)
    null = teacher.null_prefix()[None].expand(latents.shape[0], -1, -1)
    z_null, _ = teacher(latents, null)
    return z_cond, z_null


def run(recipe: dict) -> Path:
    spec = build(StudentSpec, recipe["student"], "student")
    data = build(LMData, recipe["data"], "data")
    train_cfg = build(TrainConfig, recipe["train"], "train", out_dir=recipe["out_dir"])
    teacher = load_model(spec.teacher, expect="calm").requires_grad_(False)
    utts = Utterances(data, teacher.cfg.latent_dim)
    tokenizer = teacher.conditioner.tokenizer if hasattr(teacher, "conditioner") else None
    torch.manual_seed(train_cfg.seed)
    module = DistillTraining(make_student(teacher, spec.layers))
    # The student always sees the full condition (no dropout): it replaces the CFG pair.
    full = LMObjective(p_text=0.0, p_voice=0.0)

    def batch_fn(step, micro, rank, world):
        return utts.batch(data.batch, tokenizer, full,
                          batch_generator(train_cfg.seed, step, micro, rank))

    def loss_fn(m, batch):
        z_cond, z_null = teacher_targets(teacher, batch)
        return m(batch, z_cond, z_null, spec.cfg_scale)

    return train_and_export(module, loss_fn, batch_fn, train_cfg,
                            Path(recipe["out_dir"]) / "model.safetensors", lambda m: m.calm,
                            {"recipe": "distill", "teacher": spec.teacher,
                             "layers": list(spec.layers), "cfg_scale": spec.cfg_scale})
