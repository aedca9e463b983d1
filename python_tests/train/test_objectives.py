"""CALM objectives: formulas on known values, and proofs that they train on a toy task.

Toy task: the "backbone output" is a one-hot condition c (4 classes); the target latent is a
2-D mixture of two tight Gaussians per class. A 1-step sampler must reproduce the mixture;
the statistic is the energy distance between generated and true samples.
"""
import math

import pytest
import torch
import torch.nn as nn

from calm_fast.train import objectives as obj

N_CLASS, DIM = 4, 2
CENTERS = torch.tensor([[[-1.0, -1.0], [1.0, 1.0]], [[-1.0, 1.0], [1.0, -1.0]],
                        [[0.0, 1.5], [0.0, -1.5]], [[1.5, 0.0], [-1.5, 0.0]]])


def toy_batch(n, g):
    cls = torch.randint(0, N_CLASS, (n,), generator=g)
    comp = torch.randint(0, 2, (n,), generator=g)
    x = CENTERS[cls, comp] + 0.1 * torch.randn(n, DIM, generator=g)
    return nn.functional.one_hot(cls, N_CLASS).float(), x


class ToyHead(nn.Module):
    """A small head with the published calling convention head(c, *times, x)."""

    def __init__(self, n_times, width=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(N_CLASS + 8 * n_times + DIM, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, DIM))

    def forward(self, c, *args):
        *ts, x = args
        feats = [f(t * k) for t in ts for k in (1.0, 3.0, 9.0, 27.0) for f in (torch.sin, torch.cos)]
        return self.net(torch.cat([c, *feats, x], -1))


def energy_distance(a, b):
    d = lambda u, v: torch.cdist(u, v).mean()  # noqa: E731
    return (2 * d(a, b) - d(a, a) - d(b, b)).item()


def sample_consistency(head, c, g):
    eps = torch.randn(c.shape[0], DIM, generator=g)
    return -head(c, torch.full((c.shape[0], 1), math.pi / 2), eps)  # f(eps, pi/2)


def sample_lsd(head, c, g):
    eps = torch.randn(c.shape[0], DIM, generator=g)
    n = c.shape[0]
    return eps + head(c, torch.zeros(n, 1), torch.ones(n, 1), eps)


def match(head, sampler, seed=123):
    g = torch.Generator().manual_seed(seed)
    c, x = toy_batch(2000, g)
    with torch.no_grad():
        y = sampler(head, c, g)
    per_class = [energy_distance(y[c[:, k] == 1], x[c[:, k] == 1]) for k in range(N_CLASS)]
    return max(per_class)


def train(head, loss_fn, steps, batch=256, lr=2e-3, seed=0, weight=None):
    g = torch.Generator().manual_seed(seed)
    params = list(head.parameters()) + (list(weight.parameters()) if weight else [])
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for i in range(steps):
        c, x = toy_batch(batch, g)
        loss = loss_fn(head, c, x, g, i / steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head


def test_vp_noise_preserves_variance_and_is_per_frame():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 100, 32, generator=g)
    y = obj.vp_noise_injection(x, generator=g)
    assert abs(y.var().item() - 1.0) < 0.02
    # k is shared by the channels of a frame: with x = 0 every frame is sqrt(k) * eps
    z = obj.vp_noise_injection(torch.zeros(2, 3, 4), generator=torch.Generator().manual_seed(1))
    assert z.shape == (2, 3, 4)


def test_condition_dropout_rates_and_independence():
    text, voice = obj.condition_dropout(20000, 0.2, 0.3, torch.Generator().manual_seed(0))
    assert abs(text.float().mean() - 0.2) < 0.015 and abs(voice.float().mean() - 0.3) < 0.015
    assert abs((text & voice).float().mean() - 0.06) < 0.01
    with pytest.raises(ValueError, match="p_text"):
        obj.condition_dropout(4, 1.5)


def test_eos_loss_labels_and_mask():
    logits = torch.tensor([[-10.0, -10.0, 10.0, 123.0], [10.0, -5.0, -5.0, -5.0]])
    low = obj.eos_loss(logits, torch.tensor([2, 0]))
    assert low < 1e-3  # frame 3 of stream 0 is masked, so its huge logit costs nothing
    assert obj.eos_loss(logits, torch.tensor([1, 2])) > 1.0
    with pytest.raises(ValueError, match="lengths"):
        obj.eos_loss(logits, torch.tensor([4, 0]))


def test_latent_cfg_and_distillation_loss():
    zc, zn = torch.full((1, 2, 3), 2.0), torch.full((1, 2, 3), 1.0)
    assert torch.allclose(obj.latent_cfg(zc, zn, 1.5), torch.full((1, 2, 3), 2.5))
    student = torch.full((1, 2, 3), 2.5, requires_grad=True)
    mask = torch.tensor([[True, False]])
    assert obj.latent_distillation_loss(student, zc, zn, 1.5, mask).item() == 0.0
    s2 = student.detach().clone()
    s2[0, 1] = 100.0  # masked frame: ignored
    assert obj.latent_distillation_loss(s2, zc, zn, 1.5, mask).item() == 0.0
    with pytest.raises(ValueError, match="no frame"):
        obj.latent_distillation_loss(s2, zc, zn, 1.5, torch.zeros(1, 2, dtype=torch.bool))


def test_consistency_tangent_matches_finite_differences():
    """The jvp tangent equals d/dt of f(x_t(t), t) computed by finite differences."""
    torch.manual_seed(0)
    head = ToyHead(1).double()
    g = torch.Generator().manual_seed(0)
    c, x0 = toy_batch(8, g)
    c, x0 = c.double(), x0.double()
    eps = torch.randn(8, DIM, generator=g).double()
    t = torch.full((8, 1), 0.7, dtype=torch.float64)

    def f_of(tt):
        xt = torch.cos(tt) * x0 + torch.sin(tt) * eps
        return torch.cos(tt) * xt - torch.sin(tt) * head(c, tt, xt)

    h = 1e-6
    fd = (f_of(t + h) - f_of(t - h)) / (2 * h)
    xt = torch.cos(t) * x0 + torch.sin(t) * eps
    dxt = torch.cos(t) * eps - torch.sin(t) * x0
    F_, dF = torch.func.jvp(lambda xx, tt: head(c, tt, xx), (xt, t), (dxt, torch.ones_like(t)))
    analytic = -torch.cos(t) * (F_ - dxt) - torch.sin(t) * (xt + dF)
    torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-6)


def test_head_batch_multiplier_repeats():
    z, x = torch.arange(6.0).view(3, 2), torch.arange(3.0).view(3, 1)
    zz, xx = obj.head_batch_multiplier(z, x, 4)
    assert zz.shape == (12, 2) and torch.equal(zz[3:6], z) and torch.equal(xx[9:], x)
    with pytest.raises(ValueError):
        obj.head_batch_multiplier(z, x, 0)


def test_adaptive_weight_learns_the_log_loss_scale():
    """exp(-w) term / D + w is minimised at w = log(term / D)."""
    w = obj.AdaptiveWeight(1)
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    t = torch.rand(64, 1)
    for _ in range(300):
        loss = obj._weighted(torch.full((64,), 8.0), 2, w, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(w(t), torch.full((64, 1), math.log(4.0)), atol=0.05)


@pytest.mark.slow
def test_one_step_consistency_head_learns_the_mixture():
    # ~30 s on 2 cores: 3000 steps, tangent warm-up over the first half
    torch.manual_seed(0)
    head = ToyHead(1)
    untrained = match(head, sample_consistency)
    train(head, lambda h, c, x, g, frac: obj.consistency_loss(
        h, c, x, warmup=min(1.0, 2 * frac), generator=g), steps=3000, lr=1e-3)
    trained = match(head, sample_consistency)
    assert untrained > 0.5, untrained  # measured 1.41
    assert trained < 0.12, (untrained, trained)  # measured 0.089


@pytest.mark.slow
def test_one_step_lsd_head_learns_the_mixture():
    # ~20 s on 2 cores
    torch.manual_seed(0)
    head = ToyHead(2)
    untrained = match(head, sample_lsd)
    train(head, lambda h, c, x, g, frac: obj.lsd_loss(h, c, x, generator=g), steps=1500)
    trained = match(head, sample_lsd)
    assert untrained > 0.3, untrained  # measured 0.38
    assert trained < 0.1, (untrained, trained)  # measured 0.066


def test_head_batch_multiplier_needs_fewer_backbone_passes():
    """Same number of backbone passes (steps): N=8 head draws per pass reach a lower
    flow-matching loss than N=1 (fixed evaluation noise/times)."""
    g_eval = torch.Generator().manual_seed(99)
    c_ev, x_ev = toy_batch(4000, g_eval)
    eps_ev = torch.randn(x_ev.shape, generator=g_eval)
    t_ev = torch.rand(4000, 1, generator=g_eval) * math.pi / 2

    def run(n_mult, steps=150):
        torch.manual_seed(0)
        backbone = nn.Linear(N_CLASS, N_CLASS)  # the expensive part, called once per step
        head = ToyHead(1)
        opt = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=3e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            c, x = toy_batch(64, g)
            z, xx = obj.head_batch_multiplier(backbone(c), x, n_mult)
            loss = obj.flow_matching_loss(head, z, xx, generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return obj.flow_matching_loss(head, backbone(c_ev), x_ev, eps=eps_ev, t=t_ev).item()

    one, eight = run(1), run(8)
    assert eight < 0.9 * one, (one, eight)


def test_latent_distillation_student_matches_teacher_cfg():
    """A 1-layer student regresses a 2-layer teacher's CFG-combined output (alpha 1.5); the
    teacher and its head stay frozen; the student never sees the null branch."""
    torch.manual_seed(0)
    d = 16
    teacher = nn.Sequential(nn.Linear(2 * d, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                            nn.Linear(64, d)).requires_grad_(False)
    student = nn.Sequential(nn.Linear(2 * d, 128), nn.GELU(), nn.Linear(128, d))
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        x = torch.randn(n, 4, d, generator=g)  # [B, T, d] "past latents"
        cond = torch.randn(n, 1, d, generator=g).expand(-1, 4, -1)
        return x, cond

    def z(net, x, cond):
        return net(torch.cat([x, cond], -1))

    x_ev, c_ev = batch(512)
    mask = torch.ones(512, 4, dtype=torch.bool)

    def eval_err():
        with torch.no_grad():
            return obj.latent_distillation_loss(z(student, x_ev, c_ev), z(teacher, x_ev, c_ev),
                                                z(teacher, x_ev, torch.zeros_like(c_ev)), 1.5,
                                                mask).item()

    before = eval_err()
    for _ in range(600):
        x, c = batch(128)
        with torch.no_grad():
            zc, zn = z(teacher, x, c), z(teacher, x, torch.zeros_like(c))
        loss = obj.latent_distillation_loss(z(student, x, c), zc, zn, 1.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_err()
    target_var = z(teacher, x_ev, c_ev).var().item()
    assert after < 0.1 * before and after < 0.05 * target_var, (before, after, target_var)


# -- guided attention ------------------------------------------------------------------------------
def _align_logits(B, S, T, text_end, text_len, pick):
    """Logits that put (almost) all attention of query s on key pick(b, s)."""
    x = torch.full((B, 1, S, T), -30.0)
    for b in range(B):
        for s in range(S):
            x[b, 0, s, pick(b, s)] = 30.0
    return x


def test_guided_attention_is_zero_on_the_diagonal_and_one_off_the_text():
    from calm_fast.train.objectives import guided_attention_loss

    B, S, P = 2, 12, 10
    T = P + S
    text_len, audio_len = torch.tensor([6, 4]), torch.tensor([12, 8])

    def diag(b, s):
        n, L = int(text_len[b]), int(audio_len[b])
        return P - n + min(n - 1, int((s + 0.5) / L * n))

    on = guided_attention_loss(_align_logits(B, S, T, P, text_len, diag), text_len, audio_len, P)
    assert on < 0.1
    # reading the voice/BOS rows (before the text) or its own past audio costs 1 per query
    off = guided_attention_loss(_align_logits(B, S, T, P, text_len, lambda b, s: 0),
                                text_len, audio_len, P)
    assert off == pytest.approx(1.0, abs=1e-6)
    past = guided_attention_loss(_align_logits(B, S, T, P, text_len, lambda b, s: P + s),
                                 text_len, audio_len, P)
    assert past == pytest.approx(1.0, abs=1e-6)
    # the text read backwards is penalised, though less than not reading it
    rev = guided_attention_loss(
        _align_logits(B, S, T, P, text_len,
                      lambda b, s: P - 1 - min(int(text_len[b]) - 1,
                                               int((s + 0.5) / int(audio_len[b]) * int(text_len[b])))),
        text_len, audio_len, P)
    assert on + 0.3 < rev < off


def test_guided_attention_skips_rows_without_text_and_frames_past_the_end():
    from calm_fast.train.objectives import guided_attention_loss

    B, S, P = 2, 6, 5
    T = P + S
    logits = torch.randn(B, 2, S, T, generator=torch.Generator().manual_seed(0))
    text_len, audio_len = torch.tensor([3, 0]), torch.tensor([4, 6])
    a = guided_attention_loss(logits, text_len, audio_len, P)
    # row 1 (text dropped) and row 0's frames 4, 5 do not count: changing them changes nothing
    changed = logits.clone()
    changed[1] = 5 * torch.randn(2, S, T, generator=torch.Generator().manual_seed(1))
    changed[0, :, 4:] = -changed[0, :, 4:]
    torch.testing.assert_close(guided_attention_loss(changed, text_len, audio_len, P), a)
    # masked keys (-inf) take no attention; an all-text-dropped batch gives 0, not NaN
    masked = logits.clone()
    masked[..., P:] = float("-inf")
    assert torch.isfinite(guided_attention_loss(masked, text_len, audio_len, P))
    assert guided_attention_loss(logits, torch.tensor([0, 0]), audio_len, P) == 0
    with pytest.raises(ValueError, match="text_len"):
        guided_attention_loss(logits, torch.tensor([3]), audio_len, P)
