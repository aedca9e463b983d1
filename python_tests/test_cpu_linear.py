"""SplitLinear (calm_fast/cpu_linear.py) against x @ W + b, and its use in the packed paths."""
import pytest
import torch

from calm_fast import fast_backbone as fb
from calm_fast.cpu_linear import SplitLinear, linear
from calm_fast.kernels.fused_head import head_cpu, head_ref, pack_head


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("k,n,parts", [(16, 64, 2), (16, 96, 4), (24, 40, 2), (8, 64, 1),
                                       (64, 64, 2), (128, 32, 4), (131, 48, 2)])
def test_split_linear_matches_matmul(rows, k, n, parts, native, monkeypatch):
    """Every path: the C++ gemv (1-4 rows; K not a multiple of its 4-row pass in 131), the
    row-block and the column-block batched matmuls (native=False: no extension)."""
    from calm_fast import cpu_linear

    if native and cpu_linear._gemv is None:
        pytest.skip("calm_fast._C not built")
    if not native:
        monkeypatch.setattr(cpu_linear, "_gemv", None)
    g = torch.Generator().manual_seed(rows * 100 + n)
    w, b = torch.randn(k, n, generator=g), torch.randn(n, generator=g)
    x = torch.randn(rows, k, generator=g)
    for bias in (None, b):
        L = SplitLinear(w, bias, parts=parts)
        want = x @ w if bias is None else x @ w + b
        torch.testing.assert_close(L(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x, L), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(SplitLinear(w, parts=parts).weight(), w)


def test_split_linear_picks_parts_that_divide():
    # 40 columns cannot be cut into 4 blocks of >= 32, nor into 2 of 20 >= 32: one block
    assert SplitLinear(torch.randn(4, 40), parts=4).parts == 1
    assert SplitLinear(torch.randn(4, 96), parts=4).parts == 3  # 96 = 3 x 32
    assert SplitLinear(torch.randn(4, 128), parts=2).parts == 2
    with pytest.raises(ValueError, match="float"):
        SplitLinear(torch.ones(4, 4, dtype=torch.long))


def test_split_backbone_and_head_match_plain():
    torch.manual_seed(0)
    sd = {}
    d, ff, L = 64, 128, 2
    for i in range(L):
        p = f"layers.{i}."
        sd[p + "self_attn.in_proj.weight"] = torch.randn(3 * d, d) * d ** -0.5
        sd[p + "self_attn.out_proj.weight"] = torch.randn(d, d) * d ** -0.5
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = torch.ones(d), torch.zeros(d)
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = torch.ones(d), torch.zeros(d)
        sd[p + "linear1.weight"] = torch.randn(ff, d) * d ** -0.5
        sd[p + "linear2.weight"] = torch.randn(d, ff) * ff ** -0.5
    plain = fb.pack_transformer(sd, heads=4)
    split = plain.split()
    assert split.nbytes() == plain.nbytes()
    outs = []
    for p in (plain, split):
        cache = p.make_cache(8, 4, max_streams=2)
        s = [cache.new_stream(), cache.new_stream()]
        g = torch.Generator().manual_seed(1)
        fb.prefill(p, cache, s[0], torch.randn(5, d, generator=g))
        fb.prefill(p, cache, s[1], torch.randn(3, d, generator=g))
        outs.append(fb.step(p, cache, s, torch.randn(2, d, generator=g)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_split_head_matches_reference():
    mlp = pytest.importorskip("pocket_tts.modules.mlp")
    torch.manual_seed(0)
    ph = pack_head(mlp.SimpleMLPAdaLN(8, 64, 8, 32, 2, num_time_conds=2).state_dict())
    c, x = torch.randn(3, 32), torch.randn(3, 8)
    want = head_ref(ph, c, x, [torch.full((3, 1), 0.0), torch.full((3, 1), 1.0)])
    torch.testing.assert_close(head_cpu(ph.split(), c, x, (0.0, 1.0)), want,
                               rtol=1e-5, atol=1e-5)
