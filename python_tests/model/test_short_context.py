"""Short-context Transformer: banded training pass == ring-buffer generation steps."""
import torch

from calm_fast.model.config import ShortContextConfig, TransformerConfig
from calm_fast.model.short_context import ShortContext


def make(K=3, layers=2, kv=None):
    torch.manual_seed(0)
    m = ShortContext(ShortContextConfig(K, TransformerConfig(16, layers, 4, num_kv_heads=kv)), 6, 24)
    torch.nn.init.normal_(m.out_proj.weight)  # zero-initialised: make the output visible
    return m.eval()


def test_ring_steps_equal_banded_pass_for_interleaved_streams():
    m = make(kv=2)
    x = torch.randn(2, 9, 6)
    with torch.no_grad():
        want = m(x)
    st = m.init_state(3)
    got = [[], []]
    for t in range(9):  # stream 0 in ring slot 2, stream 1 in slot 0, stepped together
        out = m.step(st, [2, 0], x[:, t])
        got[0].append(out[0])
        got[1].append(out[1])
    torch.testing.assert_close(torch.stack([torch.stack(g) for g in got]), want, rtol=1e-5,
                               atol=1e-5)


def test_one_layer_sees_exactly_the_last_K_inputs():
    m = make(K=3, layers=1)
    x = torch.randn(1, 8, 6)
    y = x.clone()
    y[:, :4] += 10.0  # changes inputs 0..3; output 7 sees inputs 5, 6, 7 only
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, 6:], b[:, 6:])
    assert not torch.allclose(a[:, 5], b[:, 5])


def test_reset_starts_a_fresh_stream():
    m = make()
    x = torch.randn(4, 6)
    st = m.init_state(1)
    first = [m.step(st, [0], x[i:i + 1]) for i in range(4)]
    st.reset([0])
    again = [m.step(st, [0], x[i:i + 1]) for i in range(4)]
    torch.testing.assert_close(torch.cat(first), torch.cat(again))
