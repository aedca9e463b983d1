"""The SEANet decoder's channels-last C++ path (calm_fast/fast/seanet.py, csrc/conv_cpu.cpp)
against the torch layers it replaces: offline, streamed in uneven chunks, taking turns with
the torch path on one stream, across batch sizes; the conv kernel alone; bad inputs."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calm_fast import _C
from calm_fast.fast import seanet as seanet_fast
from calm_fast.fast.cpu_linear import pack_panels
from calm_fast.codec.vae import VAE, VAEState, _run, vae_preset


def decoder(preset="tiny", seed=0, **over):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(vae_preset(preset), **over)
    dec = VAE(cfg).eval().decoder
    with torch.no_grad():
        for p in dec.parameters():  # away from the init, so that every term matters
            p.add_(0.05 * torch.randn_like(p))
    return dec, cfg


@torch.no_grad()
@pytest.mark.parametrize("preset,over", [
    ("tiny", {}),
    ("tiny", {"n_residual_layers": 2, "channels": 2}),  # skip into a skip; 2 output channels
    ("small_speech", {}),
])
def test_offline_and_streamed_equal_the_torch_layers(preset, over):
    dec, cfg = decoder(preset, **over)
    x = torch.randn(3, cfg.dimension, 7 * cfg.stride)
    want = _run(dec.model, x, None)
    got = seanet_fast.decode(dec, x, None)
    assert got.shape == (3, cfg.channels, 7 * cfg.frame_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    st_fast, st_ref = VAEState(3), VAEState(3)
    pieces, t = [], 0
    for n in (cfg.stride, 3, 2 * cfg.stride, 1, None):  # uneven chunks, then the rest
        chunk = x[..., t:] if n is None else x[..., t:t + n]
        n = chunk.shape[-1]
        t += n
        pieces.append(seanet_fast.decode(dec, chunk, st_fast))
        _run(dec.model, chunk, st_ref)
    torch.testing.assert_close(torch.cat(pieces, -1), want, rtol=1e-4, atol=1e-5)
    assert st_fast.tensors.keys() == st_ref.tensors.keys()
    for m, ref in st_ref.tensors.items():  # the state is kept exactly as torch keeps it
        torch.testing.assert_close(st_fast.tensors[m], ref, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_the_two_paths_take_turns_on_one_stream():
    dec, cfg = decoder()
    x = torch.randn(2, cfg.dimension, 6 * cfg.stride)
    want = _run(dec.model, x, None)
    st, out = VAEState(2), []
    for i, chunk in enumerate(torch.split(x, cfg.stride, -1)):
        out.append(seanet_fast.decode(dec, chunk, st) if i % 2 else _run(dec.model, chunk, st))
    torch.testing.assert_close(torch.cat(out, -1), want, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_buffers_reused_across_batch_sizes():
    dec, cfg = decoder()
    for B in (3, 1, 5, 2):
        x = torch.randn(B, cfg.dimension, cfg.stride)
        torch.testing.assert_close(seanet_fast.decode(dec, x), _run(dec.model, x, None),
                                   rtol=1e-4, atol=1e-5)


def test_the_module_uses_it_only_where_it_applies(monkeypatch):
    dec, cfg = decoder()
    x = torch.randn(1, cfg.dimension, cfg.stride)
    assert seanet_fast.decode(dec, x) is None  # autograd on: torch runs
    with torch.no_grad():
        assert seanet_fast.decode(dec, x.double()) is None
        assert seanet_fast.decode(dec, x) is not None
        monkeypatch.setenv("CALM_FAST_FORCE_REF", "1")
        assert seanet_fast.decode(dec, x) is None
        monkeypatch.delenv("CALM_FAST_FORCE_REF")
        with torch.no_grad():
            dec.model[0].conv.weight.mul_(2.0)  # a changed weight is repacked
        torch.testing.assert_close(dec(x), _run(dec.model, x, None), rtol=1e-4, atol=1e-5)
        dec.model[0].pad_mode = "replicate"  # not the pattern: torch runs
        assert seanet_fast._plan(dec) is None


@pytest.mark.parametrize("taps,dil,cin,N,res,add0", [
    (3, 2, 24, 40, True, False),   # dilated, a partial last panel, a residual
    (7, 1, 16, 64, False, True),   # a row-0 add (a transposed conv's tail)
    (1, 1, 5, 32, True, True),
])
def test_conv_rows_equals_conv1d(taps, dil, cin, N, res, add0):
    torch.manual_seed(taps + N)
    B, T = 3, 13  # 39 rows: blocks of 6 cross batch boundaries
    x = torch.randn(B, T + (taps - 1) * dil, cin)
    w = torch.randn(N, cin, taps) * 0.2
    b = torch.randn(N)
    r = torch.randn(B, T, N)
    a0 = torch.randn(B, N)
    want = F.conv1d(x.transpose(1, 2), w, b, dilation=dil).transpose(1, 2)
    if res:
        want = want + r
    if add0:
        want[:, 0] += a0
    panels = pack_panels(w.permute(2, 1, 0).reshape(taps * cin, N))
    y, e = np.empty((B, T, N), np.float32), np.empty((B, T, N), np.float32)
    _C.conv_rows(x.numpy(), panels.numpy(), taps, dil, T, b.numpy(),
                 a0.numpy() if add0 else None, r.numpy() if res else None, y, e, None, 2)
    torch.testing.assert_close(torch.from_numpy(y), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(e), F.elu(want), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("B,T,cin,N", [(3, 10, 24, 40), (2, 2, 8, 64), (1, 26, 33, 32)])
def test_two_taps_two_rows_at_a_time_equal_the_plain_kernel(B, T, cin, N):
    """Winograd F(2, 2) over pairs of rows (pair blocks cross batch boundaries) == the
    plain 2-tap kernel, with a row-0 add, the bias repeated per sample, raw and ELU out."""
    torch.manual_seed(T)
    x = torch.randn(B, T + 3, cin)[:, 2:]  # strided batches, one row of context
    w0, w1 = torch.randn(cin, N) * 0.2, torch.randn(cin, N) * 0.2
    panels, pairs = pack_panels(torch.cat([w0, w1])), pack_panels(w0 + w1)
    b, a0 = torch.randn(8), torch.randn(B, N)
    outs = []
    for pp in (None, pairs.numpy()):
        y, e = np.empty((B, T, N), np.float32), np.empty((B, T, N), np.float32)
        _C.conv_rows(x.numpy(), panels.numpy(), 2, 1, T, b.numpy(), a0.numpy(), None, y, e,
                     pp, 2)
        outs.append((torch.from_numpy(y), torch.from_numpy(e)))
    want = x[:, :-1] @ w0 + x[:, 1:] @ w1 + b.repeat(N // 8)
    want[:, 0] += a0
    for y, e in outs:
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(e, F.elu(want), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="an even T"):
        _C.conv_rows(x.numpy(), panels.numpy(), 2, 1, T - 1, None, None, None,
                     np.empty((B, T - 1, N), np.float32), None, pairs.numpy(), 2)


@pytest.mark.parametrize("B,T,cin,N", [(3, 10, 24, 40), (2, 2, 8, 64), (1, 26, 33, 32)])
def test_three_taps_two_rows_at_a_time_equal_the_plain_kernel(B, T, cin, N):
    """Winograd F(2, 3) over pairs of rows == the plain 3-tap kernel (residual, ELU out)."""
    torch.manual_seed(T + 1)
    x = torch.randn(B, T + 4, cin)[:, 2:]  # strided batches, two rows of context
    g0, g1, g2 = (torch.randn(cin, N) * 0.2 for _ in range(3))
    panels = pack_panels(torch.cat([g0, g1, g2]))
    wino = pack_panels(torch.cat([g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2]))
    b, r = torch.randn(N), torch.randn(B, T, N)
    want = x[:, :-2] @ g0 + x[:, 1:-1] @ g1 + x[:, 2:] @ g2 + b + r
    for pp in (None, wino.numpy()):
        y, e = np.empty((B, T, N), np.float32), np.empty((B, T, N), np.float32)
        _C.conv_rows(x.numpy(), panels.numpy(), 3, 1, T, b.numpy(), None, r.numpy(), y, e, pp,
                     2)
        torch.testing.assert_close(torch.from_numpy(y), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(e), F.elu(want), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="2 or 3 taps at dilation 1"):
        _C.conv_rows(x.numpy(), panels.numpy(), 3, 1, T, None, None, None,
                     np.empty((B, T, N), np.float32), None, panels.numpy(), 2)


def test_conv_rows_to_one_and_strided_views():
    torch.manual_seed(0)
    buf = torch.randn(2, 20, 16)
    x = buf[:, 4:]  # a view after context rows: the batch stride is 20 rows
    w = torch.randn(1, 16, 3)
    y = np.empty((2, 12), np.float32)
    _C.conv_rows_to_one(x.numpy(), w[0].t().reshape(-1).contiguous().numpy(), 0.5, 3, 2, 12,
                        y, 1)
    want = F.conv1d(x.transpose(1, 2), w, torch.tensor([0.5]), dilation=2)[:, 0]
    torch.testing.assert_close(torch.from_numpy(y), want, rtol=1e-5, atol=1e-5)


def test_conv_rows_bad_inputs():
    x = np.zeros((2, 10, 8), np.float32)
    panels = pack_panels(torch.zeros(24, 40)).numpy()
    y = np.zeros((2, 8, 40), np.float32)

    def call(**kw):
        a = dict(x=x, panels=panels, taps=3, dil=1, T=8, bias=None, add0=None, res=None,
                 y=y, e=None)
        a.update(kw)
        _C.conv_rows(**a)

    call()
    with pytest.raises(ValueError, match="too few rows"):
        call(T=9, y=np.zeros((2, 9, 40), np.float32))
    with pytest.raises(ValueError, match="no output"):
        call(y=None)
    with pytest.raises(ValueError, match="panels .* do not fit"):
        call(panels=pack_panels(torch.zeros(16, 40)).numpy())
    with pytest.raises(ValueError, match="must be \\[2, 8, N\\]"):
        call(y=np.zeros((2, 7, 40), np.float32))
    with pytest.raises(ValueError, match="does not divide"):
        call(bias=np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="add0"):
        call(add0=np.zeros((2, 39), np.float32))
    with pytest.raises(ValueError, match="res"):
        call(res=np.zeros((2, 8, 41), np.float32))
    with pytest.raises(ValueError, match="contiguous rows"):
        call(x=np.zeros((2, 8, 10), np.float32).transpose(0, 2, 1))
    with pytest.raises(ValueError, match="float32"):
        call(x=x.astype(np.float64))
    with pytest.raises(ValueError, match="writable"):
        ro = np.zeros((2, 8, 40), np.float32)
        ro.flags.writeable = False
        call(y=ro)
    with pytest.raises(ValueError, match="conv_rows_to_one"):
        _C.conv_rows_to_one(x, np.zeros(5, np.float32), 0.0, 3, 1, 8,
                            np.zeros((2, 8), np.float32))
