"""Recipe files: one TOML file describes a training run.

    kind = "lm"                 # vae | lm | distill
    out_dir = "runs/lm"
    [data]   ...                # the recipe's own data options (see each recipe's Data class)
    [model]  preset = "tiny"    # a preset plus overrides of any field, nested tables for
    [model.backbone]            # nested dataclasses (backbone, head, short_context...)
    d_model = 128
    [objective] ...             # loss options
    [train]  steps = 1000 ...   # calm_fast.train.trainer.TrainConfig fields (out_dir comes from above)

Unknown keys are errors that list the known ones, so a typo never trains silently with a
default. Relative paths are taken from the directory the command runs in.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from calm_fast.errors import CalmFastError
from calm_fast.model import config_dict

KINDS = ("vae", "lm", "distill")
SECTIONS = ("data", "model", "objective", "loss", "train", "student")
# the sections each kind reads (a table for another kind is a mistake, never ignored)
KIND_SECTIONS = {"vae": ("data", "model", "loss", "train"),
                 "lm": ("data", "model", "objective", "train"),
                 "distill": ("student", "data", "train")}


class RecipeError(CalmFastError, ValueError):
    """A recipe file that cannot be run: unreadable, unknown kind, section or key."""


def load_recipe(path) -> dict:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path} is not valid TOML: {e}") from e
    kind = raw.get("kind")
    if kind not in KINDS:
        raise RecipeError(f"{path}: kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(raw.get("out_dir"), str) or not raw["out_dir"]:
        raise RecipeError(f"{path}: out_dir (a directory for checkpoints and logs) is required")
    unknown = set(raw) - {"kind", "out_dir", *SECTIONS}
    if unknown:
        raise RecipeError(f"{path}: unknown top-level keys {sorted(unknown)}; known: kind, "
                          f"out_dir, {', '.join(SECTIONS)}")
    for s in SECTIONS:
        if not isinstance(raw.setdefault(s, {}), dict):
            raise RecipeError(f"{path}: [{s}] must be a table")
    return raw


def check_sections(recipe: dict) -> None:
    """Refuse a non-empty table that the recipe's kind does not read."""
    kind, allowed = recipe["kind"], KIND_SECTIONS[recipe["kind"]]
    extra = [s for s in SECTIONS if recipe.get(s) and s not in allowed]
    if extra:
        note = " (the model is the teacher's)" if kind == "distill" else ""
        raise RecipeError(f"a{'n' if kind == 'lm' else ''} {kind} recipe takes "
                          f"{', '.join(f'[{s}]' for s in allowed)}{note}; got "
                          f"{', '.join(f'[{s}]' for s in extra)}")


def build_preset(cls, table: dict, where: str, presets):
    """``cls`` from the preset named by the table's ``preset`` key (default "tiny"),
    overridden by the table's other keys."""
    table = dict(table)
    return build(cls, table, where, base=presets(table.pop("preset", "tiny")))


def build(cls, table: dict, where: str, base=None, **fixed):
    """``config_dict.build`` raising RecipeError (a recipe's own words for a bad key)."""
    return config_dict.build(cls, table, where, base=base, error=RecipeError, **fixed)
