"""Latent cache: round trip through the memory map, and clear errors."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from calm_fast.data.latents import LatentCache, LatentCacheError, build_latent_cache


def fake_encoder(wav):  # [1, 1, T] -> [1, 4, T // 1920]: frame means and energies
    frames = wav[0, 0, : wav.shape[-1] // 1920 * 1920].view(-1, 1920)
    return torch.stack([frames.mean(1), frames.std(1), frames.max(1).values,
                        frames.min(1).values])[None]


def make_dataset(tmp_path, n=3, sr=24_000):
    rows = []
    for i in range(n):
        wav = np.sin(np.arange(sr * (i + 1)) * 0.01 * (i + 1)).astype(np.float32) * 0.5
        sf.write(tmp_path / f"{i}.flac", wav, sr, subtype="PCM_16")
        rows.append({"path": f"{i}.flac", "text": f"utt {i}"})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "manifest.jsonl"


def test_round_trip(tmp_path):
    m = make_dataset(tmp_path)
    out = build_latent_cache(m, fake_encoder, tmp_path / "cache", sample_rate=24_000,
                             frame_rate=12.5, latent_dim=4)
    cache = LatentCache(out)
    assert len(cache) == 3 and [r["frames"] for r in cache.index] == [12, 25, 37]
    for i in range(3):
        wav, _ = sf.read(tmp_path / f"{i}.flac", dtype="float32")
        want = fake_encoder(torch.from_numpy(wav)[None, None])[0].T.numpy()
        np.testing.assert_array_equal(cache.latents(i), want)
    np.testing.assert_array_equal(cache.window(1, 5, 10), cache.latents(1)[5:15])
    assert cache.index[2]["text"] == "utt 2"
    with pytest.raises(IndexError, match="outside file 0"):
        cache.window(0, 10, 5)


def test_errors(tmp_path):
    m = make_dataset(tmp_path, n=1, sr=16_000)
    with pytest.raises(LatentCacheError, match="16000 Hz, the encoder expects 24000"):
        build_latent_cache(m, fake_encoder, tmp_path / "c", sample_rate=24_000,
                           frame_rate=12.5, latent_dim=4)
    assert not (tmp_path / "c" / "latents.f32").exists()  # nothing published
    (tmp_path / "x").mkdir()
    m2 = make_dataset(tmp_path / "x", n=1)
    with pytest.raises(LatentCacheError, match="expected \\[1, 8, frames\\]"):
        build_latent_cache(m2, fake_encoder, tmp_path / "d", sample_rate=24_000,
                           frame_rate=12.5, latent_dim=8)
    out = build_latent_cache(m2, fake_encoder, tmp_path / "e", sample_rate=24_000,
                             frame_rate=12.5, latent_dim=4)
    with open(out / "latents.f32", "r+b") as f:
        f.truncate(8)
    with pytest.raises(LatentCacheError, match="expected"):
        LatentCache(out)
    with pytest.raises(LatentCacheError, match="not a latent cache"):
        LatentCache(tmp_path / "nowhere")


def test_an_existing_cache_is_kept_and_a_bad_index_refused(tmp_path):
    m = make_dataset(tmp_path, n=2)
    kw = dict(sample_rate=24_000, frame_rate=12.5, latent_dim=4)
    out = build_latent_cache(m, fake_encoder, tmp_path / "c", **kw)
    before = (out / "latents.f32").read_bytes()
    with pytest.raises(LatentCacheError, match="already holds a latent cache .*--force"):
        build_latent_cache(m, lambda w: fake_encoder(w) * 2, out, **kw)
    assert (out / "latents.f32").read_bytes() == before  # nothing touched
    build_latent_cache(m, lambda w: fake_encoder(w) * 2, out, force=True, **kw)
    assert (out / "latents.f32").read_bytes() != before
    rows = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    good = (out / "index.jsonl").read_text()
    rows[1]["frames"] += 1  # runs one frame past the data
    (out / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LatentCacheError, match="index.jsonl:2: rows .* run past"):
        LatentCache(out)
    rows[1]["frames"] -= 1
    rows[1]["offset"] = 3  # overlaps file 0
    (out / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LatentCacheError, match="overlap"):
        LatentCache(out)
    (out / "index.jsonl").write_text(good)
    assert len(LatentCache(out)) == 2
