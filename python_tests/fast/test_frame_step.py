"""FrameStep's fixed-buffer bucket path (the one CUDA graphs capture) == the eager path.

On CPU the bucket path runs eagerly over the same padded buffers, so CI checks the padding
(scratch K/V slot, empty page rows, scratch ring slot) and the buffer filling; on a CUDA
machine the same generation runs as graph replays and must match the CPU result.
"""
import pytest
import torch

from calm_fast.runtime.generate import CALMGenerator, Request
from golden import dense_generate, ragged_tts_requests


def _music_requests(m):
    g = torch.Generator().manual_seed(6)
    return [Request(m.prefix(tags=["genre:jazz"]), 7, seed=4,
                    prompt_latents=torch.randn(6, 8, generator=g), eos_threshold=None),
            Request(m.prefix(tags=["instrument:piano"]), 3, seed=5, cfg_scale=1.5,
                    eos_threshold=None),
            Request(m.prefix(tags=["tempo:slow"]), 5, seed=6, eos_threshold=None)]


def test_bucket_path_equals_dense_tts(tts):
    reqs = ragged_tts_requests(tts)
    gen = CALMGenerator(tts, head_steps=2, graphs=True)
    got = gen.generate(reqs)
    for r, x in zip(reqs, got):
        torch.testing.assert_close(x, dense_generate(tts, r, 2), rtol=1e-4, atol=1e-4)
    # the batch shrank from 5 rows (bucket 8) to 2 (bucket 2) as streams finished
    assert gen.cache.stats()["streams"] == 1  # only the scratch stream is left


@pytest.mark.parametrize("steps", [1, 3])
def test_bucket_path_equals_dense_music(music, steps):
    reqs = _music_requests(music)
    got = CALMGenerator(music, head_steps=steps, graphs=True).generate(reqs)
    for r, x in zip(reqs, got):
        torch.testing.assert_close(x, dense_generate(music, r, steps), rtol=1e-4, atol=1e-4)


def test_too_many_rows_for_the_buckets(tts):
    reqs = [Request(tts.null_prefix(), 2, seed=i, eos_threshold=None) for i in range(3)]
    gen = CALMGenerator(tts, graphs=True, buckets=(1, 2))
    with pytest.raises(ValueError, match="exceed the largest CUDA-graph bucket"):
        gen.generate(reqs)
    assert gen.generate(reqs[:2])[1].shape == (2, 8)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("kind", ["tts", "music"])
def test_cuda_graph_generation_matches_cpu(tts, music, kind):
    m, reqs, steps = (tts, ragged_tts_requests(tts), 2) if kind == "tts" else \
        (music, _music_requests(music), 3)
    want = CALMGenerator(m, head_steps=steps).generate(reqs)
    for graphs in (False, True):
        gen = CALMGenerator(m, head_steps=steps, device="cuda", num_blocks=64, graphs=graphs)
        for _ in range(2):  # the second call replays the graphs captured by the first
            got = gen.generate(reqs)
            for x, w in zip(got, want):
                torch.testing.assert_close(x, w, rtol=2e-3, atol=2e-3)
        assert gen.cache.stats()["streams"] == (1 if graphs else 0)
