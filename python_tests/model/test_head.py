"""The AdaLN head module: published-module parity, packed fused path, jvp, parametrisations."""
import math

import pytest
import torch
from torch.func import jvp

from calm_fast.model.config import HeadConfig
from calm_fast.model.head import AdaLNHead, consistency_fn, lsd_flow_map
from calm_fast.fast.head import head_cpu, pack_head


def make(kind="lsd"):
    torch.manual_seed(0)
    h = AdaLNHead(HeadConfig(32, 3, kind), 8, 24)
    with torch.no_grad():  # the DiT init zeroes modulations and output: perturb everything
        for p in h.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return h


def test_untrained_head_outputs_zero():
    h = AdaLNHead(HeadConfig(32, 2), 8, 24)
    out = h(torch.randn(4, 24), torch.rand(4, 1), torch.rand(4, 1), torch.randn(4, 8))
    assert torch.equal(out, torch.zeros(4, 8))


@pytest.mark.peer
@pytest.mark.parametrize("kind", ["lsd", "consistency"])
def test_equals_the_published_module(kind):
    mlp = pytest.importorskip("pocket_tts.modules.mlp")
    ours = make(kind)
    peer = mlp.SimpleMLPAdaLN(8, 32, 8, 24, 3, num_time_conds=ours.cfg.num_time_conds)
    peer.load_state_dict(ours.state_dict(), strict=True)
    c, x = torch.randn(5, 24), torch.randn(5, 8)
    ts = [torch.rand(5, 1) for _ in range(ours.cfg.num_time_conds)]
    torch.testing.assert_close(ours(c, *ts, x), peer(c, *ts, x), rtol=1e-5, atol=1e-6)


def test_packed_fused_path_equals_the_module():
    h = make()
    c, x = torch.randn(5, 24), torch.randn(5, 8)
    s, t = torch.full((5, 1), 0.25), torch.full((5, 1), 0.75)
    torch.testing.assert_close(head_cpu(pack_head(h.state_dict()), c, x, (0.25, 0.75)), h(c, s, t, x),
                               rtol=1e-5, atol=1e-5)


def test_jvp_through_the_head_equals_finite_differences():
    h = make("consistency").double()
    c, x = torch.randn(3, 24, dtype=torch.double), torch.randn(3, 8, dtype=torch.double)
    t = torch.full((3, 1), 0.7, dtype=torch.double)
    dx = torch.randn(3, 8, dtype=torch.double)
    _, tangent = jvp(lambda xx, tt: h(c, tt, xx), (x, t), (dx, torch.ones_like(t)))
    e = 1e-6
    fd = (h(c, t + e, x + e * dx) - h(c, t - e, x - e * dx)) / (2 * e)
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-7)


def test_parametrisation_boundary_conditions():
    h = make("consistency")
    c, x = torch.randn(4, 24), torch.randn(4, 8)
    # f(x, 0) = x: the consistency function is the identity at t = 0
    torch.testing.assert_close(consistency_fn(h, c, x, torch.zeros(4, 1)), x)
    # f(eps, pi/2) = -F(eps, pi/2)
    t = torch.full((4, 1), math.pi / 2)
    torch.testing.assert_close(consistency_fn(h, c, x, t), -h(c, t, x), atol=1e-6, rtol=1e-6)
    g = make("lsd")
    s = torch.rand(4, 1)
    torch.testing.assert_close(lsd_flow_map(g, c, x, s, s), x)  # X(s -> s) = x


def test_wrong_time_count():
    with pytest.raises(ValueError, match="2 time input"):
        make("lsd")(torch.randn(2, 24), torch.rand(2, 1), torch.randn(2, 8))
