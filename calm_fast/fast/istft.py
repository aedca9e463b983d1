"""Fast CPU decode of the iSTFT VAE family (codec/istft.py is the reference and the oracle).

The reference runs channel-first convolutions and complex tensors; per streamed frame most
of its time is call overhead, the transposed convolution (a slow path in torch) and
``F.fold``. Here, in [B, T, C] layout end to end:
* the causal input conv (kernel k) is one matmul over the k stacked frames (unfold);
* the kernel == stride transposed conv is one matmul to ``upsample x d`` and a reshape;
* each ConvNeXt block's depthwise causal conv is k multiply-adds of shifted views;
* the STFT frames come from cos/sin of the phase times the magnitude (no complex polar),
  one real irfft, and the overlap-add of 4 hops is 4 shifted slice-adds, not ``F.fold``.
The streaming state is the reference's own (same names, shapes and layout), so a state
may move between the two paths (``decode_slots`` gathers its rows either way).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from calm_fast.codec.istft import ISTFTState, ISTFTVAE
from calm_fast.fast import ops
from calm_fast.fast.cpu_linear import cached_for


def applies(vae, x: torch.Tensor | None = None) -> bool:
    """Whether ``decode`` takes the fast path (CPU, float32, no autograd, not forced off)."""
    if not isinstance(vae, ISTFTVAE) or ops.force_reference():
        return False
    p = vae.decoder.out.weight
    ok = lambda t: t.device.type == "cpu" and t.dtype == torch.float32  # noqa: E731
    return ok(p) and not torch.is_grad_enabled() and (x is None or ok(x))


def _packed(dec):
    conv = dec.conv_in
    up = dec.up
    tensors = [conv.weight, conv.bias, up.weight, up.bias]

    def make():
        k = conv.kernel_size[0]
        w_in = conv.weight.detach().permute(0, 2, 1).reshape(conv.out_channels, k * conv.in_channels)
        n = up.kernel_size[0]
        w_up = up.weight.detach().permute(0, 2, 1).reshape(up.in_channels, n * up.out_channels)
        return {"w_in": w_in.t().contiguous(), "b_in": conv.bias.detach().clone(),
                "w_up": w_up.contiguous(), "b_up": up.bias.detach().clone(), "k": k, "n": n,
                "dw": [(b.dw.weight.detach()[:, 0, :].t().contiguous(), b.dw.bias.detach())
                       for b in dec.blocks]}
    return cached_for(dec, "_fast_packed", tensors + [b.dw.weight for b in dec.blocks], make)


def _history(x, state, k):
    """[B, T, C] chunk with its k - 1 frames of history ([B, C, k - 1] reference state) in
    front, and the next state."""
    full = torch.cat([state.transpose(1, 2), x], 1)
    return full, full[:, full.shape[1] - (k - 1):].transpose(1, 2).contiguous()


def _decoder(dec, z, st: dict):
    """z [B, J, C] and the reference decoder state -> (audio [B, J x frame_size], state)."""
    cfg = dec.cfg
    P = _packed(dec)
    B, J, _ = z.shape
    out = dict(st)
    k = P["k"]
    full, out["conv_in"] = _history(z, st["conv_in"], k)
    cols = full.unfold(1, k, 1).transpose(2, 3).reshape(B, J, -1)  # [B, J, k x C] by (tap, c)
    h = torch.addmm(P["b_in"], cols.reshape(B * J, -1), P["w_in"])
    h = (h @ P["w_up"]).view(B, J * P["n"], -1) + P["b_up"]  # [B, F, d]
    Fr = h.shape[1]
    for i, (blk, (w_dw, b_dw)) in enumerate(zip(dec.blocks, P["dw"])):
        kd = w_dw.shape[0]
        full, out[f"block{i}"] = _history(h, st[f"block{i}"], kd)
        y = b_dw + full[:, :Fr] * w_dw[0]
        for j in range(1, kd):
            y = y + full[:, j:j + Fr] * w_dw[j]
        y = F.layer_norm(y, y.shape[-1:], blk.norm.weight, blk.norm.bias, blk.norm.eps)
        y = F.linear(F.gelu(F.linear(y, blk.fc1.weight, blk.fc1.bias)), blk.fc2.weight,
                     blk.fc2.bias)
        h = h + blk.gamma * y
    o = F.linear(F.layer_norm(h, h.shape[-1:], dec.norm.weight, dec.norm.bias, dec.norm.eps),
                 dec.out.weight, dec.out.bias)
    nb = dec.n_bins
    mag = torch.exp(o[..., :nb].clamp(max=cfg.log_mag_max))
    ph = o[..., nb:]
    frames = torch.fft.irfft(torch.complex(mag * torch.cos(ph), mag * torch.sin(ph)),
                             n=cfg.n_fft, dim=-1) * (dec.window * dec.gain)  # [B, F, n_fft]
    hop, r = cfg.hop, cfg.n_fft // cfg.hop
    if r * hop != cfg.n_fft:
        raise ValueError(f"the fast overlap-add needs n_fft a multiple of hop, got "
                         f"{cfg.n_fft}, {cfg.hop}")
    parts = frames.view(B, Fr, r, hop)
    # output block t (hop samples) = sum over q of frame t - q's part q (+ the old tail)
    y = frames.new_zeros(B, Fr + r - 1, hop)
    for q in range(r):
        y[:, q:q + Fr] += parts[:, :, q]
    tail = st["ola"].view(B, r - 1, hop)
    y[:, :r - 1] += tail
    y = y.reshape(B, -1)
    n_out = Fr * hop
    out["ola"] = y[:, n_out:].contiguous()
    return y[:, :n_out], out


@torch.no_grad()
def decode(vae: ISTFTVAE, latents: torch.Tensor, state: ISTFTState | None = None):
    """``vae.decode`` (latents [B, J, C] -> audio [B, 1, J x frame_size]) on the fast path
    when it applies, else the reference."""
    if not applies(vae, latents):
        return vae.decode(latents, state)
    vae._check_latents(latents)
    dec = vae.decoder
    if state is None:
        st = dec.init_state(latents.shape[0], latents.device, latents.dtype)
        return _decoder(dec, latents, st)[0][:, None]
    if latents.shape[0] != state.batch:
        raise ValueError(f"state holds {state.batch} streams, latents have {latents.shape[0]}")
    if not state.dec:
        state.dec = dec.init_state(state.batch, latents.device, latents.dtype)
    y, state.dec = _decoder(dec, latents, state.dec)
    return y[:, None]
