"""The causal audio VAE (Mimi-shaped): SEANet convolutions + Transformers + Gaussian bottleneck.

    encode: wav -> SEANet encoder (strides r_1..r_n) -> Transformer (window `context`)
            -> strided conv to the latent rate -> mean (and log-variance) -> latents
    decode: latents -> 1x1 conv -> depthwise transposed conv to the encoder rate
            -> Transformer (window `context`) -> SEANet decoder -> wav

Everything is causal, so the whole signal can be processed at once (``encode`` /
``decode``) or frame by frame with explicit state (``encode_step`` / ``decode_step`` with a
``VAEState``): each conv keeps its last (kernel - stride) input samples, each transposed
conv its overlapping tail, and each Transformer the keys/values of its last ``context - 1``
rows. This module is the pure-torch reference; ``calm_fast.fast.vae`` decodes the same
state on the C++ paths (paged windowed attention, channels-last SEANet). The two paths agree within float rounding
(python_tests/test_vae.py). Names of the tensors equal the Pocket TTS ``MimiModel``'s, so its
checkpoints load as they are (``calm_fast.compat.mimi``); Pocket TTS exports no log-variance
(inference uses the mean), so ``logvar`` is our own tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from calm_fast.model.config import TransformerConfig
from calm_fast.model.rope import rope_tables
from calm_fast.model.transformer import Transformer, causal_mask


@dataclass(frozen=True)
class VAEConfig:
    name: str
    sample_rate: int = 24_000
    frame_rate: float = 12.5
    latent_dim: int = 32
    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    n_residual_layers: int = 1
    ratios: tuple[int, ...] = (6, 5, 4)  # decoder order; the encoder runs them reversed
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    encoder_layers: int = 2
    decoder_layers: int = 2
    num_heads: int = 8
    ffn_mult: float = 4.0
    layer_scale: float | None = 0.01
    context: int = 250  # attention window, in encoder-rate rows

    def __post_init__(self):
        if self.frame_size * self.frame_rate != self.sample_rate:
            raise ValueError(f"{self.sample_rate} Hz is not a whole number of samples per "
                             f"{self.frame_rate} Hz frame")
        if self.frame_size % self.hop:
            raise ValueError(f"frame of {self.frame_size} samples is not a multiple of the "
                             f"SEANet hop {self.hop} (ratios {self.ratios})")

    @property
    def hop(self) -> int:
        return math.prod(self.ratios)

    @property
    def frame_size(self) -> int:
        return round(self.sample_rate / self.frame_rate)

    @property
    def stride(self) -> int:
        """Encoder-rate rows per latent frame."""
        return self.frame_size // self.hop

    def transformer(self, layers: int) -> TransformerConfig:
        return TransformerConfig(self.dimension, layers, self.num_heads, ffn_mult=self.ffn_mult,
                                 layer_scale=self.layer_scale)


VAE_PRESETS = {
    "tiny": lambda: VAEConfig("tiny", sample_rate=1600, latent_dim=8, dimension=32, n_filters=4,
                              ratios=(4, 2), encoder_layers=1, decoder_layers=1, num_heads=2,
                              context=12),
    # A laptop-CPU speech codec for the training recipe (configs/speech_vae.toml): the
    # pocket layout (24 kHz, 12.5 Hz, 32-dim latents) at 1.1M parameters; a training step on
    # 8 x 1 s takes ~1.2 s on 2 cores (pocket-sized widths are ~4x slower).
    "small_speech": lambda: VAEConfig("small_speech", dimension=128, n_filters=16,
                                      encoder_layers=1, decoder_layers=1, num_heads=4),
    # Pocket TTS codec (english.yaml): 200 Hz SEANet, 2+2 layers, window 250, x16 to 12.5 Hz.
    "pocket": lambda: VAEConfig("pocket"),
    # Paper speech VAE (Table 13): ratios 6-5-4-4-4 reach 12.5 Hz directly; 8+8 layers,
    # context 10 s. The width is not given; we keep Mimi's 512.
    "paper_speech": lambda: VAEConfig("paper_speech", ratios=(6, 5, 4, 4, 4), encoder_layers=8,
                                      decoder_layers=8, context=125),
    # Paper music VAE: 32 kHz mono, 25 Hz, 128-dim latents, ratios 8-8-5-4, 4+4 layers, 30 s.
    "music": lambda: VAEConfig("music", sample_rate=32_000, frame_rate=25.0, latent_dim=128,
                               ratios=(8, 8, 5, 4), encoder_layers=4, decoder_layers=4,
                               context=750),
}


def vae_preset(name: str) -> VAEConfig:
    if name not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; known: {sorted(VAE_PRESETS)}")
    return VAE_PRESETS[name]()


# -- streaming state ------------------------------------------------------------------------------
@dataclass
class VAEState:
    """Everything a stream batch carries between calls: per-module tensors keyed by module,
    and for each Transformer a paged cache with one stream per batch row."""

    batch: int
    tensors: dict = field(default_factory=dict)  # batch-first tensors, one row per stream
    caches: dict = field(default_factory=dict)  # the fast path's: module -> (cache, [ids])


# -- convolutions -------------------------------------------------------------------------------
class CausalConv(nn.Module):
    """Conv1d padded on the left only: offline with zeros (or the first sample, 'replicate'),
    streaming with the previous call's last (effective kernel - stride) input samples."""

    def __init__(self, cin, cout, kernel, stride=1, dilation=1, groups=1, bias=True,
                 pad_mode="constant"):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, stride, dilation=dilation, groups=groups,
                              bias=bias)
        self.pad_mode = pad_mode
        self.keep = (kernel - 1) * dilation + 1 - stride

    def forward(self, x, state: VAEState | None = None):
        S = self.conv.stride[0]
        if x.shape[-1] % S:
            raise ValueError(f"conv input of {x.shape[-1]} steps is not a multiple of stride {S}")
        if self.keep > 0:
            prev = None if state is None else state.tensors.get(self)
            if prev is None:
                prev = (x[..., :1].expand(-1, -1, self.keep) if self.pad_mode == "replicate"
                        else x.new_zeros(x.shape[0], x.shape[1], self.keep))
            x = torch.cat([prev, x], -1)
            if state is not None:
                state.tensors[self] = x[..., -self.keep:].clone()
        return self.conv(x)


class CausalConvTranspose(nn.Module):
    """ConvTranspose1d whose overlapping tail (kernel - stride samples, bias excluded) is
    added to the next call's head; offline, the tail is dropped at the end."""

    def __init__(self, cin, cout, kernel, stride, groups=1, bias=True):
        super().__init__()
        self.convtr = nn.ConvTranspose1d(cin, cout, kernel, stride, groups=groups, bias=bias)
        self.tail = kernel - stride

    def _overlap_add(self, x):
        """kernel = 2 x stride (every SEANet / VAE upsampler) as one GEMM (or, depthwise, one
        outer product) and an overlap-add of the two halves: torch's CPU transposed conv
        takes a slow im2col path on these short inputs (profile: benchmarks/results/vae.csv)."""
        c = self.convtr
        B, C, T = x.shape
        S, O = c.stride[0], c.out_channels
        if c.groups == 1:
            xt = x.transpose(1, 2).reshape(B * T, C)
            a = (xt @ c.weight.reshape(C, -1)).view(B, T, O, 2 * S).transpose(1, 2)
        else:  # depthwise
            a = x[..., None] * c.weight[:, 0][None, :, None, :]
        y = x.new_zeros(B, O, T + 1, S)
        y[:, :, :T] += a[..., :S]
        y[:, :, 1:] += a[..., S:]
        y = y.view(B, O, (T + 1) * S)
        return y if c.bias is None else y + c.bias[:, None]

    def forward(self, x, state: VAEState | None = None):
        c = self.convtr
        # depthwise: always; dense: only for few rows, where the GEMM measured faster
        # (B x T <= 256; torch's path wins on long inputs at batch 16)
        fast = c.kernel_size[0] == 2 * c.stride[0] and (
            (c.groups == 1 and x.shape[0] * x.shape[-1] <= 256)
            or (c.groups == c.in_channels == c.out_channels))
        y = self._overlap_add(x) if fast else c(x)
        if self.tail <= 0:
            return y
        if state is not None:
            prev = state.tensors.get(self)
            if prev is not None:
                y[..., :self.tail] += prev
            tail = y[..., -self.tail:]
            if self.convtr.bias is not None:
                tail = tail - self.convtr.bias[:, None]
            state.tensors[self] = tail.clone()
        return y[..., :-self.tail]


class ResBlock(nn.Module):
    def __init__(self, dim, kernel, dilation, compress, pad_mode):
        super().__init__()
        hidden = dim // compress
        self.block = nn.ModuleList([nn.ELU(), CausalConv(dim, hidden, kernel, dilation=dilation,
                                                         pad_mode=pad_mode),
                                    nn.ELU(), CausalConv(hidden, dim, 1, pad_mode=pad_mode)])

    def forward(self, x, state=None):
        return x + _run(self.block, x, state)


def _run(layers, x, state):
    """A stack of ELUs and stateful layers (convs, residual blocks)."""
    for layer in layers:
        x = layer(x) if isinstance(layer, nn.ELU) else layer(x, state)
    return x


class SEANetEncoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        pm, mult = "constant", 1
        m = [CausalConv(c.channels, c.n_filters, c.kernel_size, pad_mode=pm)]
        for r in reversed(c.ratios):
            ch = mult * c.n_filters
            m += [ResBlock(ch, c.residual_kernel_size, c.dilation_base ** j, c.compress, pm)
                  for j in range(c.n_residual_layers)]
            m += [nn.ELU(), CausalConv(ch, 2 * ch, 2 * r, stride=r, pad_mode=pm)]
            mult *= 2
        m += [nn.ELU(), CausalConv(mult * c.n_filters, c.dimension, c.last_kernel_size, pad_mode=pm)]
        self.model = nn.ModuleList(m)

    def forward(self, x, state=None):
        return _run(self.model, x, state)


class SEANetDecoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        pm, mult = "constant", 2 ** len(c.ratios)
        m = [CausalConv(c.dimension, mult * c.n_filters, c.kernel_size, pad_mode=pm)]
        for r in c.ratios:
            ch = mult * c.n_filters
            m += [nn.ELU(), CausalConvTranspose(ch, ch // 2, 2 * r, r)]
            m += [ResBlock(ch // 2, c.residual_kernel_size, c.dilation_base ** j, c.compress, pm)
                  for j in range(c.n_residual_layers)]
            mult //= 2
        m += [nn.ELU(), CausalConv(c.n_filters, c.channels, c.last_kernel_size, pad_mode=pm)]
        self.model = nn.ModuleList(m)

    def forward(self, x, state=None):
        return _run(self.model, x, state)


# -- transformer with a bounded window ------------------------------------------------------------
class WindowedTransformer(nn.Module):
    """Causal Transformer over [B, C, T] feature maps; each row sees the last ``context``
    rows (itself included). Streaming keeps, per stream, the K/V of its last
    ``context - 1`` rows, how many of them are real (``n``: a new stream has none) and its
    position, all as batch-first tensors in ``VAEState.tensors`` (so streams at different
    positions batch together, and a zeroed row is a fresh stream)."""

    def __init__(self, cfg: TransformerConfig, context: int):
        super().__init__()
        if context < 1:
            raise ValueError(f"the attention window must be >= 1 rows, got {context}")
        self.transformer = Transformer(cfg)
        self.context = context

    def forward(self, x, state: VAEState | None = None):
        h = x.transpose(1, 2)
        if state is None:
            mask = causal_mask(h.shape[1], h.device, window=self.context)
            return self.transformer(h, mask).transpose(1, 2)
        if self in state.caches:
            raise ValueError("this VAEState was started on the fast path (calm_fast.fast.vae):"
                             " keep decoding it there")
        return self._stream(h, state.tensors).transpose(1, 2)

    def _stream(self, h, tensors: dict):
        B, T, _ = h.shape
        c, P = self.transformer.cfg, self.context - 1
        key = lambda name: (self, name)  # noqa: E731
        if key("k") not in tensors:
            shape = (B, c.num_layers, P, c.kv_heads, c.head_dim)
            tensors[key("k")], tensors[key("v")] = h.new_zeros(shape), h.new_zeros(shape)
            tensors[key("n")] = torch.zeros(B, dtype=torch.long, device=h.device)
            tensors[key("pos")] = torch.zeros(B, dtype=torch.long, device=h.device)
        K, V, n, pos = (tensors[key(s)] for s in ("k", "v", "n", "pos"))
        qpos = pos[:, None] + torch.arange(T, device=h.device)[None]  # [B, T]
        cos, sin = rope_tables(c.head_dim, c.max_period, qpos.reshape(-1))
        cos, sin = cos.view(B, T, 1, -1), sin.view(B, T, 1, -1)
        # keys: the P kept rows (the last n of them real), then the T new ones
        j = torch.arange(P, device=h.device)[None]
        kpos = torch.cat([pos[:, None] - P + j, qpos], 1)  # [B, P + T]
        real = torch.cat([j >= (P - n)[:, None], torch.ones_like(qpos, dtype=torch.bool)], 1)
        d = qpos[:, :, None] - kpos[:, None, :]  # [B, T, P + T]
        mask = (real[:, None, :] & (d >= 0) & (d < self.context))[:, None]
        newk, newv = [], []
        for li, layer in enumerate(self.transformer.layers):
            q, k, v = layer.project(h, cos, sin)  # [B, T, heads, D]
            k, v = torch.cat([K[:, li], k], 1), torch.cat([V[:, li], v], 1)
            newk.append(k[:, k.shape[1] - P:])
            newv.append(v[:, v.shape[1] - P:])
            rep = q.shape[2] // k.shape[2]
            kk, vv = (t.repeat_interleave(rep, 2) if rep != 1 else t for t in (k, v))
            a = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2),
                                               vv.transpose(1, 2), attn_mask=mask)
            h = layer.finish(h, a.transpose(1, 2).flatten(2))
        if P:
            tensors[key("k")], tensors[key("v")] = torch.stack(newk, 1), torch.stack(newv, 1)
        tensors[key("n")] = (n + T).clamp(max=P)
        tensors[key("pos")] = pos + T
        return h


class _Wrap(nn.Module):
    """Holds a conv under ``.conv`` / ``.convtr`` (the published nesting of key names)."""

    def __init__(self, name, mod):
        super().__init__()
        setattr(self, name, mod)
        self.name = name

    def forward(self, x, state=None):
        return getattr(self, self.name)(x, state)


class _Projection(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.output_proj = nn.Conv1d(cin, cout, 1, bias=False)


# -- the VAE --------------------------------------------------------------------------------------
class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = c = cfg
        self.encoder = SEANetEncoder(c)
        self.decoder = SEANetDecoder(c)
        self.encoder_transformer = WindowedTransformer(c.transformer(c.encoder_layers), c.context)
        self.decoder_transformer = WindowedTransformer(c.transformer(c.decoder_layers), c.context)
        k = 2 * c.stride if c.stride > 1 else 1
        self.downsample = _Wrap("conv", CausalConv(c.dimension, c.latent_dim, k, c.stride,
                                                   bias=False, pad_mode="replicate"))
        self.logvar = _Wrap("conv", CausalConv(c.dimension, c.latent_dim, k, c.stride,
                                               bias=False, pad_mode="replicate"))
        nn.init.zeros_(self.logvar.conv.conv.weight)  # starts at unit variance
        self.quantizer = _Projection(c.latent_dim, c.dimension)
        self.upsample = _Wrap("convtr", CausalConvTranspose(c.dimension, c.dimension, k, c.stride,
                                                            groups=c.dimension, bias=False))

    # -- checks ------------------------------------------------------------------------------
    def _check_wav(self, wav):
        if wav.dim() != 3 or wav.shape[1] != self.cfg.channels:
            raise ValueError(f"audio must be [B, {self.cfg.channels}, T], got {tuple(wav.shape)}")
        if wav.shape[-1] == 0:
            raise ValueError("empty audio")
        if not torch.isfinite(wav).all():
            raise ValueError("audio holds NaN or Inf")

    def _check_latents(self, z):
        if z.dim() != 3 or z.shape[-1] != self.cfg.latent_dim or z.shape[1] == 0:
            raise ValueError(f"latents must be [B, frames >= 1, {self.cfg.latent_dim}], "
                             f"got {tuple(z.shape)}")
        if not torch.isfinite(z).all():
            raise ValueError("latents hold NaN or Inf")

    def pad(self, wav):
        """Zero-pad the end to whole frames (the last partial frame is kept)."""
        extra = -wav.shape[-1] % self.cfg.frame_size
        return F.pad(wav, (0, extra))

    # -- encode --------------------------------------------------------------------------------
    def _features(self, wav, state):
        return self.encoder_transformer(self.encoder(wav, state), state)

    def encode(self, wav: torch.Tensor, state: VAEState | None = None,
               sample: bool = False, generator=None) -> torch.Tensor:
        """wav [B, channels, T] at ``sample_rate`` -> latents [B, frames, latent_dim] (the
        mean, or a sample of the posterior with ``sample=True``)."""
        self._check_wav(wav)
        if state is not None and sample:
            raise ValueError("streaming encode returns the mean; sample offline")
        if state is not None and wav.shape[-1] % self.cfg.frame_size:
            raise ValueError(f"streaming encode takes whole frames of {self.cfg.frame_size} "
                             f"samples, got {wav.shape[-1]}")
        h = self._features(self.pad(wav), state)
        mean = self.downsample(h, state)
        if sample:
            logvar = self.logvar(h, state)
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            mean = mean + torch.exp(0.5 * logvar) * eps
        return mean.transpose(1, 2)

    def posterior(self, wav: torch.Tensor):
        """(mean, logvar) [B, latent_dim, frames] of the whole signal (training)."""
        self._check_wav(wav)
        h = self._features(self.pad(wav), None)
        return self.downsample(h), self.logvar(h).clamp(-30.0, 20.0)

    # -- decode --------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, state: VAEState | None = None) -> torch.Tensor:
        """latents [B, frames, latent_dim] -> wav [B, channels, frames * frame_size]."""
        self._check_latents(latents)
        x = self.quantizer.output_proj(latents.transpose(1, 2))
        x = self.upsample(x, state)
        x = self.decoder_transformer(x, state)
        return self.decoder(x, state)

    def init_state(self, batch: int) -> VAEState:
        """Fresh streaming state for ``batch`` streams (use one for encoding, another for
        decoding)."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        return VAEState(batch)

    def encode_step(self, wav: torch.Tensor, state: VAEState) -> torch.Tensor:
        return self.encode(wav, state)

    def decode_step(self, latents: torch.Tensor, state: VAEState) -> torch.Tensor:
        if latents.shape[0] != state.batch:
            raise ValueError(f"state holds {state.batch} streams, latents have {latents.shape[0]}")
        return self.decode(latents, state)

    # -- training -------------------------------------------------------------------------------
    def forward(self, wav: torch.Tensor, generator=None):
        """Training pass: sample the posterior, decode. Returns (recon [B, C, T'], kl scalar,
        mean [B, latent_dim, frames]); T' is T padded to whole frames."""
        mean, logvar = self.posterior(wav)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator,
                                                         dtype=mean.dtype, device=mean.device)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        return self.decode(z.transpose(1, 2)), kl, mean
