"""Bad inputs to the dataset builders and the latent cache: each is refused with a calm_fast
error naming the argument and the value, before anything is synthesised or written."""
from __future__ import annotations

import json

import numpy as np
import pytest

from calm_fast.data.latents import LatentCache, LatentCacheError, build_latent_cache
from calm_fast.data.music import build_music_dataset
from calm_fast.data.speech import build_speech_dataset
from calm_fast.data.tools import BuilderError, run_jobs
from calm_fast.errors import ArgumentError, ArgumentTypeError, CalmFastError

SPEECH_CASES = [  # (keyword arguments, error class, words the message must hold)
    (dict(n_utterances=-1), ArgumentError, ["n_utterances", "-1"]),
    (dict(n_utterances=2.5), ArgumentTypeError, ["n_utterances", "2.5"]),
    (dict(n_utterances=2, workers=0), ArgumentError, ["workers", "got 0"]),
    (dict(hours=-1), ArgumentError, ["hours", "-1"]),
    (dict(hours=float("nan")), ArgumentError, ["hours", "finite"]),
    (dict(n_utterances=2, n_pseudo=-1), ArgumentError, ["n_pseudo", "-1"]),
    (dict(n_utterances=2, held_out_voices=2.0), ArgumentError, ["held_out_voices", "2"]),
    (dict(n_utterances=2, sources=("nope",)), ArgumentError, ["sources", "'nope'"]),
    (dict(n_utterances=2, val_share=0.6, test_share=0.5), ArgumentError, ["val_share", "< 1"]),
    (dict(n_utterances=2, seed="x"), ArgumentTypeError, ["seed", "'x'"]),
    (dict(n_utterances=2, wer_threshold=0), ArgumentError, ["wer_threshold", "got 0"]),
]


@pytest.mark.parametrize("kw,cls,words", SPEECH_CASES, ids=[str(c[0]) for c in SPEECH_CASES])
def test_speech_builder_checks_its_arguments_first(tmp_path, kw, cls, words):
    out = tmp_path / "out"
    with pytest.raises(cls) as e:
        build_speech_dataset(out, **kw)
    assert isinstance(e.value, CalmFastError)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not out.exists()  # nothing written


MUSIC_CASES = [
    (dict(n_renders=0), ArgumentError, ["n_renders", "got 0"]),
    (dict(n_renders=2, max_seconds=-1), ArgumentError, ["max_seconds", "-1"]),
    (dict(n_renders=2, mma_fraction=2), ArgumentError, ["mma_fraction", "2"]),
    (dict(n_renders=2, workers="a"), ArgumentTypeError, ["workers", "'a'"]),
]


@pytest.mark.parametrize("kw,cls,words", MUSIC_CASES, ids=[str(c[0]) for c in MUSIC_CASES])
def test_music_builder_checks_its_arguments_first(tmp_path, kw, cls, words):
    out = tmp_path / "out"
    with pytest.raises(cls) as e:
        build_music_dataset(out, **kw)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not out.exists()


def test_an_output_folder_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    for build, kw in ((build_speech_dataset, dict(n_utterances=2)),
                      (build_music_dataset, dict(n_renders=2))):
        with pytest.raises(ArgumentError, match="is a file, not a folder"):
            build(tmp_path / "f", **kw)
        with pytest.raises(ArgumentTypeError, match="folder path"):
            build(3, **kw)
    assert (tmp_path / "f").read_text() == "x"


def _die(_):
    import os
    os._exit(3)  # a worker killed mid-job


def test_a_dead_worker_is_one_clear_error():
    with pytest.raises(BuilderError, match="worker process died.*__main__"):
        run_jobs(_die, [1, 2], workers=2)


def _cache(root, index, total=10, dim=4, meta=None):
    root.mkdir()
    np.zeros((total, dim), np.float32).tofile(root / "latents.f32")
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))
    (root / "meta.json").write_text(json.dumps(meta or {"latent_dim": dim, "total_frames": total}))
    return root


def test_latent_caches_are_validated_on_open(tmp_path):
    with pytest.raises(LatentCacheError, match="is not a latent cache"):
        LatentCache(tmp_path / "missing")
    bad = _cache(tmp_path / "a", [{"offset": 0, "frames": 4}], meta={"latent_dim": 4})
    with pytest.raises(LatentCacheError, match="lacks latent_dim/total_frames"):
        LatentCache(bad)
    short = _cache(tmp_path / "b", [{"offset": 0, "frames": 4}], total=10)
    (short / "latents.f32").write_bytes(b"\0" * 12)
    with pytest.raises(LatentCacheError, match="expected 160"):
        LatentCache(short)
    empty = tmp_path / "manifest.jsonl"
    empty.write_text("")
    with pytest.raises(LatentCacheError, match="lists no files"):
        build_latent_cache(empty, None, tmp_path / "c", sample_rate=24000, frame_rate=12.5,
                           latent_dim=4)
