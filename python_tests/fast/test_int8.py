"""Int8 weights (fast/int8.py, csrc/gemm_cpu.cpp): the native kernel against its torch
reference, bit for bit, on both integer kernels and any thread count; the error against
fp32; the decode step's native int8 layers."""
import pytest
import torch

from calm_fast.fast import backbone as fb
from calm_fast.fast import int8 as I
from calm_fast.fast import ops

from isa_runs import outputs_under
from paged_fixtures import random_sd
from test_decode_step import op_by_op, run_steps

SHAPES = [(7, 5, 1), (64, 96, 3), (33, 70, 13), (256, 33, 64), (1024, 256, 8), (1024, 64, 1)]

needs_native = pytest.mark.skipif(not ops.has_native("linear_i8"), reason="calm_fast._C not built")


def _case(K, N, M, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(K, N, generator=g), torch.randn(N, generator=g),
            3 * torch.randn(M, K, generator=g))


@needs_native
@pytest.mark.parametrize("K,N,M", SHAPES)
def test_native_int8_is_the_reference_bit_for_bit_on_any_threads(K, N, M):
    w, b, x = _case(K, N, M)
    lin = I.Int8Linear(w, b)
    assert lin.native and lin.panels.shape == (-(-N // 32), 4 * -(-K // 4), 32)
    want = I.reference(x, lin.weight_q(), lin.scales, lin.b)
    before = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert torch.equal(lin(x), want), t
    finally:
        torch.set_num_threads(before)
    # the packing round-trips and the column sums are the weights'
    q, scales = I.quantize_weight(w)
    assert torch.equal(lin.weight_q(), q) and torch.equal(lin.scales, scales)
    assert torch.equal(lin.colsum, q.sum(0, dtype=torch.int32))


def test_int8_error_against_fp32_and_the_reference_without_the_extension(monkeypatch):
    w, b, x = _case(512, 384, 4, seed=3)
    ref = x @ w + b
    lin = I.Int8Linear(w, b)
    rel = ((lin(x) - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.02, rel  # 8-bit rows and weights: ~1% on Gaussian rows
    monkeypatch.setattr(ops, "has_native", lambda name=None: False)
    plain = I.Int8Linear(w, b)
    assert not plain.native
    assert torch.equal(plain(x), lin(x))  # the reference is the fallback, the same bits


def test_a_row_with_nan_or_inf_gives_nan_only_in_that_row():
    w, b, x = _case(64, 40, 3)
    lin = I.Int8Linear(w, b)
    x[0, 5], x[2, 1] = float("nan"), float("inf")
    y = lin(x)
    assert torch.isnan(y[0]).all() and torch.isnan(y[2]).all() and torch.isfinite(y[1]).all()
    zero = lin(torch.zeros(2, 64))
    assert torch.equal(zero, b.expand(2, 40))


@needs_native
def test_bad_int8_panels_are_refused_with_their_shapes():
    from calm_fast import _C

    w, _, x = _case(16, 40, 2)
    p, s, c = I.Int8Linear(w).native_panels()
    y = torch.empty(2, 40).numpy()
    with pytest.raises(ValueError, match="do not fit a \\[16, 40\\] projection"):
        _C.linear_i8(x.numpy(), (p, s[:20], c), y, 1)
    with pytest.raises(ValueError, match="dtype"):
        _C.linear_i8(x.numpy(), (p.astype("int16"), s, c), y, 1)
    with pytest.raises(ValueError, match="panels, scales, colsum"):
        _C.linear_i8(x.numpy(), (p, s), y, 1)
    with pytest.raises(ValueError, match="Int8Linear takes"):
        I.Int8Linear(w)(torch.zeros(2, 15))
    with pytest.raises(ValueError, match="at most 65536"):
        I.Int8Linear(torch.zeros(I.MAX_IN + 1, 1))


INT8_SCRIPT = """
import torch
from calm_fast import _C
from calm_fast.fast.int8 import Int8Linear
out = {"dot": bool(_C.has_int8_dot)}
for K, N, M in SHAPES:
    g = torch.Generator().manual_seed(K + N + M)
    w, x = torch.randn(K, N, generator=g), torch.randn(M, K, generator=g)
    out[(K, N, M)] = Int8Linear(w)(x)
torch.save(out, "PATH")
"""


@needs_native
def test_the_plain_integer_kernel_gives_the_vnni_kernels_bits(tmp_path):
    """CALM_FAST_INT8_DOT=0 keeps the plain integer loops on a host with AVX512-VNNI: exact
    integer sums, so the same bits (elsewhere both runs take the plain loops)."""
    from calm_fast import _C

    res = outputs_under(tmp_path, "CALM_FAST_INT8_DOT", ("1", "0"),
                        INT8_SCRIPT.replace("SHAPES", repr(SHAPES)))
    assert res["0"]["dot"] is False and res["1"]["dot"] == _C.has_int8_dot
    for key, y in res["1"].items():
        if key != "dot":
            assert torch.equal(y, res["0"][key]), key


@needs_native
def test_the_decode_step_runs_int8_layers_natively(monkeypatch):
    sd = random_sd(layers=2, seed=4)
    q = fb.pack_transformer(sd, heads=4).quantized()
    assert fb.native_layers(q) is not None
    calls = []
    real = ops.native_decode_step
    monkeypatch.setattr(ops, "native_decode_step", lambda *a: calls.append(1) or real(*a))
    native = run_steps(q, 2, 6, 3)
    assert calls
    # op by op (torch attention and norms around the same int8 linears): equal to rounding
    calls.clear()
    with monkeypatch.context() as m:
        op_by_op(m)
        op = run_steps(q, 2, 6, 3)
    assert not calls
    torch.testing.assert_close(native, op, rtol=1e-4, atol=1e-4)
    fp = run_steps(fb.pack_transformer(sd, heads=4).split(), 2, 6, 3)
    rel = ((native - fp).norm() / fp.norm()).item()
    assert rel < 0.05, rel
