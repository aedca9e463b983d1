"""The fused short-context ring attention (Triton) vs its torch reference, and the whole
ShortContext step through it (interpreter on CPU, or a GPU)."""
import pytest
import torch

pytest.importorskip("triton")
from calm_fast.kernels.short_context_step import (  # noqa: E402
    ring_attention_ref, ring_attention_triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.triton_interpret


def _case(seed, dtype, heads, kv_heads, D=8, K=4, slots=4, layers=2):
    g = torch.Generator().manual_seed(seed)
    B = 3
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)  # noqa: E731
    q, k, v = mk(B, heads, D), mk(B, kv_heads, D), mk(B, kv_heads, D)
    ring = (mk(slots, layers, K, kv_heads, D), mk(slots, layers, K, kv_heads, D))
    # ragged: a first row (empty ring), a partial first lap, a wrapped ring
    sl = torch.tensor([2, 0, 3], device=DEVICE)
    pos = torch.tensor([0, 2, 9], device=DEVICE)
    return q, k, v, ring, sl, pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16]
                         + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (4, 1)])
def test_ring_attention_triton_matches_reference(dtype, heads, kv_heads):
    q, k, v, (rk, rv), sl, pos = _case(heads * 10 + kv_heads, dtype, heads, kv_heads)
    rk2, rv2 = rk.clone(), rv.clone()
    layer = 1  # a strided view into the [slots, layers, ...] ring
    out = ring_attention_triton(q, k, v, rk[:, layer], rv[:, layer], sl, pos)
    ref = ring_attention_ref(q.float(), k.float(), v.float(), rk2[:, layer].float(),
                             rv2[:, layer].float(), sl, pos)
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    # the ring: the new rows written (rotated) at pos % K, every other entry untouched
    want_k, want_v = rk.clone(), rv.clone()
    ring_attention_ref(q, k, v, want_k[:, layer], want_v[:, layer], sl, pos)
    torch.testing.assert_close(rk.float(), want_k.float(), rtol=tol, atol=tol)
    assert torch.equal(rv, want_v)
    assert torch.equal(rk[:, 0], rk2[:, 0])  # the other layer is not written


def test_first_row_attends_to_itself_only():
    q, k, v, (rk, rv), sl, pos = _case(3, torch.float32, 2, 2)
    out = ring_attention_triton(q, k, v, rk[:, 0], rv[:, 0], sl, pos)
    torch.testing.assert_close(out[0], v[0], rtol=1e-6, atol=1e-6)  # pos 0: softmax of one


def test_bad_inputs():
    q, k, v, (rk, rv), sl, pos = _case(4, torch.float32, 4, 2)
    with pytest.raises(ValueError, match="not a multiple"):
        ring_attention_triton(q[:, :3], k, v, rk[:, 0], rv[:, 0], sl, pos)
    with pytest.raises(ValueError, match="must be"):
        ring_attention_triton(q, k, v, rk[:, 0], rv[:, 0], sl[:2], pos)
    with pytest.raises(ValueError, match="does not fit"):
        ring_attention_triton(q, k, v, rk[:, 0, :, :1], rv[:, 0, :, :1], sl, pos)


def test_short_context_step_on_triton_equals_banded_forward(monkeypatch):
    """Several steps of ShortContext.step with the Triton op == the banded training pass."""
    from calm_fast.fast import ops
    from calm_fast.model.config import ShortContextConfig, TransformerConfig
    from calm_fast.model.short_context import ShortContext

    torch.manual_seed(0)
    sc = ShortContext(ShortContextConfig(3, TransformerConfig(16, 2, 2, num_kv_heads=1)), 4, 8)
    torch.nn.init.normal_(sc.out_proj.weight)
    sc = sc.to(DEVICE)
    if DEVICE == "cpu":  # route the op to the kernel under the interpreter
        monkeypatch.setattr(ops, "ring_attention", ring_attention_triton)
    x = torch.randn(2, 5, 4, device=DEVICE)
    want = sc(x)
    state = sc.init_state(2, device=DEVICE)
    got = torch.stack([sc.step(state, [0, 1], x[:, t]) for t in range(5)], 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
