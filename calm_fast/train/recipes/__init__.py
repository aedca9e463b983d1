"""Training recipes driven by TOML files: ``calm-fast train vae|lm|distill RECIPE.toml``.

One module per recipe (``vae``, ``lm``, ``distill``); ``config`` reads and checks the files.
"""
from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

from calm_fast.train.recipes import distill, lm, vae
from calm_fast.train.recipes.config import SECTIONS, RecipeError, check_sections, load_recipe

# settings a rerun may change without --force: where it stops (the schedule is the same)
_RESUMABLE = {("train", "stop_after"), ("train", "progress"), ("train", "log_every"),
              ("train", "sample_every")}


def apply_overrides(recipe: dict, sets: list[str]) -> dict:
    """``section.key=value`` overrides from the command line; the value is TOML
    (``train.steps=10``, ``data.splits=["train"]``, ``out_dir="runs/x"``)."""
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set takes section.key=value, got {item!r}")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare string
        *path, last = key.split(".")
        top = path[0] if path else last
        if top not in ("kind", "out_dir", *SECTIONS):
            raise RecipeError(f"--set {key}: unknown section {top!r}; known: kind, out_dir, "
                              f"{', '.join(SECTIONS)}")
        table = recipe
        for p in path:
            table = table.setdefault(p, {})
            if not isinstance(table, dict):
                raise RecipeError(f"--set {key}: {p} is not a table")
        table[last] = parsed
    return recipe


def _flat(recipe: dict) -> dict:
    out = {}
    for k, v in recipe.items():
        if isinstance(v, dict):
            out.update({(k, *kk): vv for kk, vv in _flat(v).items()} if v else {(k,): {}})
        else:
            out[(k,)] = v
    return out


def claim_out_dir(recipe: dict, force: bool = False) -> None:
    """Record the recipe in ``out_dir/recipe.json``; a rerun into a run made by different
    settings (other than where it stops) is an error unless ``force``. Only a folder that
    holds a checkpoint or an export counts as a run (an attempt that failed on a bad key
    left neither, and its record is replaced)."""
    out = Path(recipe["out_dir"])
    mine = out / "recipe.json"
    ran = any((out / f).is_file() for f in ("last.safetensors", "model.safetensors",
                                            "vae.safetensors"))
    if ran and mine.is_file() and not force:
        old = _flat(json.loads(mine.read_text()))
        new = _flat(json.loads(json.dumps(recipe)))
        diff = sorted(k for k in set(old) | set(new)
                      if old.get(k) != new.get(k) and k[:2] not in _RESUMABLE)
        if diff:
            shown = "; ".join(f"{'.'.join(k)}: {old.get(k, '<unset>')!r} -> "
                              f"{new.get(k, '<unset>')!r}" for k in diff[:5])
            raise RecipeError(f"{out} holds a run of other settings ({shown}): resuming it "
                              f"would mix them; use another out_dir, or --force to go on")
    out.mkdir(parents=True, exist_ok=True)
    # Under torchrun every rank checks the folder, but one writes the record: two ranks
    # sharing a temporary name raced (one renamed it away under the other).
    if os.environ.get("RANK", "0") != "0":
        return
    tmp = mine.with_name(f".recipe.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(recipe, indent=1, sort_keys=True))
    tmp.replace(mine)


def run_recipe(path, kind: str | None = None, sets: list[str] = (), force: bool = False):
    """Run the recipe in ``path``; ``kind`` (from the command line) must match its kind."""
    recipe = apply_overrides(load_recipe(path), list(sets))
    if kind is not None and recipe["kind"] != kind:
        raise RecipeError(f"{path} is a {recipe['kind']!r} recipe, not {kind!r}")
    check_sections(recipe)
    claim_out_dir(recipe, force)
    return {"vae": vae.run, "lm": lm.run, "distill": distill.run}[recipe["kind"]](recipe)
