"""The aligner (train/aligner.py): monotonic alignment search finds the best path, and the
trained aligner recovers the durations of audio whose phoneme timing is known."""
import itertools
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from calm_fast.train.aligner import AlignerError, aligned_tokens, align_cache, mas, read_durations


def brute_force(logp):
    """The best monotonic path by enumeration: every split of T frames into P runs >= 1."""
    P, T = logp.shape
    best, arg = -float("inf"), None
    for cuts in itertools.combinations(range(1, T), P - 1):
        edges = (0,) + cuts + (T,)
        dur = [b - a for a, b in zip(edges, edges[1:])]
        score = sum(float(logp[p, edges[p]:edges[p + 1]].sum()) for p in range(P))
        if score > best:
            best, arg = score, dur
    return arg


@pytest.mark.parametrize("seed", range(6))
def test_mas_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    P, T = 2 + seed % 3, 7 + seed % 2
    logp = torch.randn(P, T, generator=g, dtype=torch.float64)
    dur = mas(logp)
    assert int(dur.sum()) == T and bool((dur >= 1).all())
    assert dur.tolist() == brute_force(logp)


def test_mas_refuses_more_phonemes_than_frames():
    with pytest.raises(AlignerError, match="3 frames cannot hold 4 phonemes"):
        mas(torch.zeros(4, 3))


class ToneTokenizer:
    """'a'..'e' -> ids 1..5 (0 is the word boundary, as in the phoneme tokenizer)."""
    vocab_size = 6

    def encode(self, text):
        return [ord(c) - ord("a") + 1 for c in text]


def tone(freq, n, sr):
    """A tone with 5 ms fades (no click at its edges: a click has no pitch to align)."""
    env = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.005 * sr))
    return 0.3 * env * np.sin(2 * np.pi * freq * np.arange(n) / sr)


def tone_cache(tmp_path):
    """A latent cache (zero latents) over utterances of 'phonemes' that are tones of 5
    pitches with known lengths, silence at both ends; returns (cache dir, true durations)."""
    sr, sub, hop = 24000, 8, 240
    freqs = {1: 300.0, 2: 600.0, 3: 1200.0, 4: 2400.0, 5: 4000.0}
    g = np.random.default_rng(0)
    rows, truth, frames_all, off = [], [], [], 0
    for i in range(24):
        text = "a"
        while len(text) < int(g.integers(3, 6)) or len(text) < 3:  # no letter twice in a row:
            text += g.choice([c for c in "abcde" if c != text[-1]])  # its boundary is unknowable
        ids = aligned_tokens(ToneTokenizer().encode(text))
        dur = [int(g.integers(8, 20)) for _ in ids]
        F = -(-sum(dur) // sub)
        dur[-1] += F * sub - sum(dur)  # the trailing silence fills the last frame
        wav = np.concatenate([tone(freqs[t], d * hop, sr) if t else
                              0.001 * g.standard_normal(d * hop)
                              for t, d in zip(ids, dur)]).astype(np.float32)
        sf.write(tmp_path / f"{i}.wav", wav, sr)
        rows.append({"path": f"{i}.wav", "text": text, "split": "train", "speaker_id": "s",
                     "offset": off, "frames": F})
        truth.append(dur)
        frames_all.append(np.zeros((F, 4), np.float32))
        off += F
    lat = tmp_path / "lat"
    lat.mkdir()
    np.concatenate(frames_all).tofile(lat / "latents.f32")
    (lat / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (lat / "meta.json").write_text(json.dumps({"latent_dim": 4, "frame_rate": 12.5,
                                               "sample_rate": sr, "total_frames": off}))
    (tmp_path / "manifest.jsonl").write_text("")
    return lat, truth


def test_align_cache_recovers_known_durations(tmp_path):
    """The durations written must match the true ones to within a few 10 ms sub-frames."""
    lat, truth = tone_cache(tmp_path)
    align_cache(lat, tmp_path / "manifest.jsonl", ToneTokenizer(), steps=200, batch=8,
                lr=5e-3, log=lambda *a: None)
    got = read_durations(lat)
    assert sorted(got) == list(range(24))
    err = [abs(a - b) for i, d in enumerate(truth) for a, b in zip(got[i], d)]
    assert all(sum(got[i]) == sum(truth[i]) for i in range(24))
    assert np.mean(err) < 1.5 and np.percentile(err, 95) <= 4, (np.mean(err), max(err))


def test_mas_batch_equals_each_alone():
    g = torch.Generator().manual_seed(7)
    shapes = [(3, 9), (5, 6), (2, 2), (4, 11)]
    logp = torch.full((4, 5, 11), 123.0)  # padding garbage must not matter
    for b, (P, T) in enumerate(shapes):
        logp[b, :P, :T] = torch.randn(P, T, generator=g)
    from calm_fast.train.aligner import mas_batch
    got = mas_batch(logp, [P for P, _ in shapes], [T for _, T in shapes])
    for b, (P, T) in enumerate(shapes):
        assert got[b].tolist() == mas(logp[b, :P, :T]).tolist() == brute_force(logp[b, :P, :T])


def test_data_align_command_writes_durations_and_says_what_is_missing(tmp_path, capsys,
                                                                      monkeypatch):
    from calm_fast.cli import main
    from calm_fast.train import aligner

    lat, truth = tone_cache(tmp_path)
    assert main(["data", "align", str(tmp_path / "nowhere"), str(tmp_path / "m.jsonl")]) == 1
    assert "not a latent cache" in capsys.readouterr().err
    # the command reads with the phoneme tokenizer: here the tones' own one stands in
    monkeypatch.setattr("calm_fast.model.phonemes.PhonemeTokenizer", ToneTokenizer)
    assert main(["data", "align", str(lat), str(tmp_path / "manifest.jsonl"), "--steps", "3"]) == 0
    got = aligner.read_durations(lat)
    assert len(got) == len(truth) and all(sum(got[i]) == sum(truth[i]) for i in got)
