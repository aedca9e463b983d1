"""Training recipes driven by TOML files: ``calm-fast train vae|lm|distill RECIPE.toml``.

One module per recipe (``vae``, ``lm``, ``distill``); ``config`` reads and checks the files.
"""
from __future__ import annotations

import tomllib

from calm_fast.train.recipes import distill, lm, vae
from calm_fast.train.recipes.config import RecipeError, check_sections, load_recipe


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
        table = recipe
        for p in path:
            table = table.setdefault(p, {})
            if not isinstance(table, dict):
                raise RecipeError(f"--set {key}: {p} is not a table")
        table[last] = parsed
    return recipe


def run_recipe(path, kind: str | None = None, sets: list[str] = ()):
    """Run the recipe in ``path``; ``kind`` (from the command line) must match its kind."""
    recipe = apply_overrides(load_recipe(path), list(sets))
    if kind is not None and recipe["kind"] != kind:
        raise RecipeError(f"{path} is a {recipe['kind']!r} recipe, not {kind!r}")
    check_sections(recipe)
    return {"vae": vae.run, "lm": lm.run, "distill": distill.run}[recipe["kind"]](recipe)
