"""SplitLinear (calm_fast/fast/cpu_linear.py) against x @ W + b, and its use in the packed paths."""
import pytest
import torch

from calm_fast.fast import backbone as fb
from calm_fast.fast import ops
from calm_fast.fast.cpu_linear import SplitLinear, linear
from calm_fast.fast.head import head_cpu, head_ref, pack_head
from isa_runs import outputs_under


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 8, 13, 24])
@pytest.mark.parametrize("k,n,parts", [(16, 64, 2), (16, 96, 4), (24, 40, 2), (8, 64, 1),
                                       (64, 64, 2), (128, 32, 4), (131, 48, 2), (5, 7, 2)])
def test_split_linear_matches_matmul(rows, k, n, parts, native, bf16, monkeypatch):
    """Every path: the C++ panel kernel (any rows: 8-row blocks when 8 divides them, else
    6-row blocks and a remainder; full panels and a partial last one when n is not a
    multiple of 32), and without the extension the row-block and column-block batched
    matmuls. bf16: the same against the bf16-rounded rows and weight, in half the bytes on
    the native path (on an AVX512-BF16 host through its dot products; the widening kernel
    is test_bf16_without_dot_products_gives_the_same_numbers)."""
    from calm_fast.fast import cpu_linear

    if native and ops._C is None:
        pytest.skip("calm_fast._C not built")
    if not native:
        monkeypatch.setattr(ops, "_C", None)
    g = torch.Generator().manual_seed(rows * 100 + n)
    w, b = torch.randn(k, n, generator=g), torch.randn(n, generator=g)
    x = torch.randn(rows, k, generator=g)
    wr = w.bfloat16().float() if bf16 else w
    xr = x.bfloat16().float() if bf16 else x
    for bias in (None, b):
        L = SplitLinear(w, bias, parts=parts, bf16=bf16)
        assert L.native == native
        want = xr @ wr if bias is None else xr @ wr + b
        torch.testing.assert_close(L(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x, L), want, rtol=1e-5, atol=1e-5)
        per = 2 if bf16 and native else 4
        assert L.nbytes() == per * k * n + (0 if bias is None else 4 * n)
    assert torch.equal(SplitLinear(w, parts=parts, bf16=bf16).weight(), wr)
    if bf16:  # the rounding is real: these weights are not all bf16 numbers
        assert not torch.equal(wr, w)


BF16_SCRIPT = """
import torch
from calm_fast import _C
from calm_fast.fast.cpu_linear import SplitLinear
g = torch.Generator().manual_seed(0)
out = {"dot": _C.has_bf16_dot}
for m, k, n in [(1, 1024, 96), (1, 33, 40), (8, 64, 64), (13, 31, 33), (64, 128, 100)]:
    w, b, x = (torch.randn(k, n, generator=g), torch.randn(n, generator=g),
               torch.randn(m, k, generator=g))
    out[(m, k, n)] = SplitLinear(w, b, bf16=True)(x)
torch.save(out, "PATH")
"""


def test_bf16_without_dot_products_gives_the_same_numbers(tmp_path):
    """CALM_FAST_BF16_DOT=0 keeps the widening kernel: the same rounded numbers, so the
    same outputs as the dot-product kernel to fp32 rounding (both paths on a host that has
    AVX512-BF16; elsewhere both runs take the widening kernel)."""
    from calm_fast import _C

    if _C is None:
        pytest.skip("calm_fast._C not built")
    res = outputs_under(tmp_path, "CALM_FAST_BF16_DOT", ("1", "0"), BF16_SCRIPT)
    assert res["0"]["dot"] is False and res["1"]["dot"] == _C.has_bf16_dot
    for key, y in res["1"].items():
        if key != "dot":
            torch.testing.assert_close(y, res["0"][key], rtol=1e-5, atol=1e-5)


def test_packed_linear_keeps_autograd_and_rejects_bad_shapes():
    from calm_fast import _C
    from calm_fast.fast.cpu_linear import pack_panels

    w = torch.randn(16, 40)
    L = SplitLinear(w, torch.zeros(40))
    x = torch.randn(3, 16, requires_grad=True)
    L(x).sum().backward()  # the autograd path is a plain matmul on the unpacked weight
    torch.testing.assert_close(x.grad, w.sum(1).expand(3, 16))
    panels = pack_panels(w)
    assert panels.shape == (2, 16, 32) and panels[1, :, 8:].abs().sum() == 0
    with pytest.raises(ValueError, match="panels must be"):
        _C.linear(x.detach().numpy(), panels.numpy(), None, torch.empty(3, 70).numpy(), 2)
    with pytest.raises(ValueError, match="dtype"):
        _C.linear(x.detach().double().numpy(), panels.numpy(), None,
                  torch.empty(3, 40).numpy(), 2)


def test_split_linear_picks_parts_that_divide(monkeypatch):
    from calm_fast.fast import cpu_linear

    monkeypatch.setattr(ops, "_C", None)  # the bmm paths' block counts
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


def test_cached_for_remakes_only_when_a_weight_changes():
    """Packed inference copies of trainable weights (the SEANet plan, the windowed
    Transformer's native layers) are kept until a weight is replaced or updated in place."""
    from calm_fast.fast.cpu_linear import cached_for

    mod = torch.nn.Linear(24, 40)
    made = []
    make = lambda: made.append(1) or SplitLinear(mod.weight.detach().t().contiguous())  # noqa: E731
    a = cached_for(mod, "_packed", [mod.weight, mod.bias], make)
    assert cached_for(mod, "_packed", [mod.weight, mod.bias], make) is a and len(made) == 1
    with torch.no_grad():
        mod.weight.mul_(2)  # an in-place update (an optimizer step) repacks
    b = cached_for(mod, "_packed", [mod.weight, mod.bias], make)
    assert b is not a and len(made) == 2
    x = torch.randn(3, 24)
    torch.testing.assert_close(b(x), x @ mod.weight.detach().t(), rtol=1e-5, atol=1e-5)
