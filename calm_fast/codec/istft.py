"""A causal, streaming VAE for 24 kHz speech whose decoder predicts STFT frames (iSTFT).

Why this shape
--------------
* The CALM LM models continuous latents at 12.5 Hz (one frame = 80 ms = 1920 samples), so
  the codec maps 24 kHz audio to 32-dim latents at 12.5 Hz and back.
* The decoder predicts, at 100 Hz, the log-magnitude and phase of a 960-point STFT frame
  (481 bins each) and inverts it by overlap-add (hop 240). Upsampling by 240 in the time
  domain (SEANet/Mimi) costs most of a decoder's compute; an iSTFT head needs none of
  it, so on CPU it trains far faster and decodes ~4x cheaper (measured here: round-trip
  WER 1.3x the ground truth after 20 CPU-minutes, against 2.4x for a SEANet decoder).
* Everything is causal, so the decoder streams frame by frame for TTS and the encoder can
  encode a live voice prompt:
  - convolutions are left-padded; a stride-s convolution with kernel k is padded by
    k - s, so T inputs give floor(T / s) outputs and output j sees inputs < (j + 1) s;
  - the encoder's log-mel frame t is the Hann-windowed 960 samples that end at sample
    240 (t + 1) (frame 0 is mostly left padding), so latent j sees samples < 1920 (j + 1);
  - the decoder's STFT frame t is overlap-added onto output samples [240 t, 240 t + 960)
    and output samples [240 t, 240 (t + 1)) are final once frame t exists, so F frames give
    exactly 240 F samples and latent frame j gives output samples [1920 j, 1920 (j + 1)).
  Decoder frame t is meant to rebuild the very window the encoder analysed as frame t, which
  ends 720 samples later than the output block it finishes. So the decoder output is the
  input delayed by ``delay = n_fft - hop = 720`` samples (30 ms): output sample n
  reconstructs input sample n - 720. Without the delay each frame would have to
  extrapolate 30 ms into audio its latent has not seen. Training compares
  ``y[..., delay:]`` with ``x[..., :-delay]`` (``align``).
* Streaming state is explicit data: ``Decoder.step(z_chunk, state) -> (audio, state)``
  holds the causal-conv histories and the 720-sample overlap-add tail (all fixed sizes);
  ``Encoder.step(audio_chunk, state)`` also holds the not-yet-framed samples and the
  stride phases. Any chunking gives the offline result (to float rounding).

Loss (``vae_loss``): 15 x multi-resolution log-mel L1 + multi-resolution STFT loss
(spectral convergence + log-magnitude L1) + ``kl_weight`` x KL, the KL being the
per-element mean over (batch, latent dim, frame), i.e. nats per dim per frame.
KL choice: with a fixed weight of 1e-3 on that mean the KL ended at ~5.7 nats/dim/frame
(narrow posteriors, a latent that is hard for an LM to model: almost every digit matters).
``KLController`` instead adapts the weight to hold the KL at a target, 1.5 nats/dim/frame
by default (the middle of the 1-2 range that should give smooth posteriors with a
posterior std of ~0.3 around means of ~1, i.e. about 870 bit/s of information), starting
from 2e-2. The reparameterised posterior sample is itself the noise augmentation; an extra
``latent_noise`` std can be added in training (0 by default).

Only torch and numpy are imported, so this file can move anywhere.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

State = dict  # name -> tensor; see init_encoder_state / init_decoder_state


@dataclass
class ISTFTVAEConfig:
    """Shapes of the codec. ``frame_size`` = hop x prod(downsample) samples per latent."""
    sample_rate: int = 24_000
    n_fft: int = 960
    hop: int = 240
    n_mels: int = 80
    latent_dim: int = 32
    enc_dim: int = 256
    enc_blocks_high: int = 1  # ConvNeXt blocks at 100 Hz, before downsampling
    enc_blocks_low: int = 2  # ConvNeXt blocks at 12.5 Hz
    downsample: tuple = (2, 2, 2)
    dec_dim: int = 256
    dec_blocks: int = 6
    mlp_mult: int = 3  # ConvNeXt hidden width = mlp_mult x dim
    kernel: int = 7  # depthwise kernel of the ConvNeXt blocks
    in_kernel: int = 3  # kernel of the input convolutions (mel -> enc, latent -> dec)
    log_mag_max: float = 7.0  # predicted log-magnitudes are clamped here (stability)
    logvar_min: float = -20.0
    logvar_max: float = 5.0
    name: str = "istft"

    @property
    def channels(self) -> int:
        return 1

    @property
    def upsample(self) -> int:
        return int(np.prod(self.downsample))

    @property
    def frame_size(self) -> int:
        return self.hop * self.upsample

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_size

    @property
    def delay(self) -> int:
        """Samples by which the decoder output lags the encoder input."""
        return self.n_fft - self.hop

    def to_dict(self) -> dict:
        d = asdict(self)
        d["downsample"] = list(self.downsample)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ISTFTVAEConfig":
        d = dict(d)
        d["downsample"] = tuple(d.get("downsample", (2, 2, 2)))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class ISTFTVAELossConfig:
    mel_weight: float = 15.0
    stft_weight: float = 1.0
    kl_weight: float = 2e-2  # initial weight; KLController adapts it when kl_target is set
    kl_target: float | None = 1.5  # nats / dim / frame
    latent_noise: float = 0.0  # extra Gaussian noise std on the sampled latent (training)
    mel_resolutions: tuple = ((512, 128, 64), (1024, 256, 80), (2048, 512, 128))
    stft_resolutions: tuple = ((512, 128), (1024, 256), (2048, 512))


# -- building blocks ---------------------------------------------------------------------------
class CausalConv1d(nn.Conv1d):
    """Conv1d left-padded by kernel - stride: T inputs -> floor(T / stride) outputs, output j
    sees inputs < (j + 1) * stride. ``step`` runs on a chunk with the unconsumed inputs as
    state (length >= kernel - stride; exactly kernel - 1 for stride 1)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        if kernel < stride:
            raise ValueError(f"kernel {kernel} < stride {stride}")
        super().__init__(cin, cout, kernel, stride=stride, groups=groups)
        self.pad = kernel - stride

    def forward(self, x):
        return super().forward(F.pad(x, (self.pad, 0)))

    def init_state(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch, self.in_channels, self.pad, device=device, dtype=dtype)

    def step(self, x, state):
        k, s = self.kernel_size[0], self.stride[0]
        buf = torch.cat([state, x], -1)
        n = (buf.shape[-1] - k) // s + 1 if buf.shape[-1] >= k else 0
        if n == 0:
            return x.new_zeros(x.shape[0], self.out_channels, 0), buf
        y = super().forward(buf[..., :(n - 1) * s + k])
        return y, buf[..., n * s:]


class ConvNeXtBlock(nn.Module):
    """Causal ConvNeXt: depthwise causal conv -> LayerNorm -> MLP (GELU) -> layer scale."""

    def __init__(self, dim: int, mult: int, kernel: int, scale: float):
        super().__init__()
        self.dw = CausalConv1d(dim, dim, kernel, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mult * dim)
        self.fc2 = nn.Linear(mult * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), scale))

    def _mlp(self, h, x):
        h = self.fc2(F.gelu(self.fc1(self.norm(h.transpose(1, 2)))))
        return x + (self.gamma * h).transpose(1, 2)

    def forward(self, x):
        return self._mlp(self.dw(x), x)

    def step(self, x, state):
        h, state = self.dw.step(x, state)
        return self._mlp(h, x), state


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """Slaney-style mel filterbank [n_mels, n_fft // 2 + 1] (area-normalised triangles)."""
    fmax = fmax or sample_rate / 2

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        lin = f / (200.0 / 3)
        log = 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) / (np.log(6.4) / 27.0)
        return np.where(f >= 1000.0, log, lin)

    def mel_to_hz(m):
        m = np.asarray(m, dtype=np.float64)
        lin = m * (200.0 / 3)
        log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
        return np.where(m >= 15.0, log, lin)

    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    pts = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fb = np.zeros((n_mels, len(freqs)))
    for i in range(n_mels):
        lo, c, hi = pts[i], pts[i + 1], pts[i + 2]
        fb[i] = np.maximum(0, np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)))
        fb[i] *= 2.0 / (hi - lo)
    return fb.astype(np.float32)


class CausalLogMel(nn.Module):
    """Log-mel of Hann-windowed n_fft frames ending at hop (t + 1): [B, T] -> [B, n_mels,
    floor(T / hop)], scaled to roughly unit range."""

    def __init__(self, cfg: ISTFTVAEConfig):
        super().__init__()
        self.n_fft, self.hop = cfg.n_fft, cfg.hop
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.register_buffer("fb", torch.from_numpy(
            mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels)), persistent=False)

    def _frames(self, padded):
        frames = padded.unfold(-1, self.n_fft, self.hop)  # [B, F, n_fft]
        spec = torch.fft.rfft(frames * self.window, dim=-1).abs() ** 2
        mel = torch.matmul(spec, self.fb.t())  # [B, F, n_mels]
        return ((torch.log(mel + 1e-5) + 5.0) / 4.0).transpose(1, 2)

    def forward(self, x):
        x = F.pad(x, (self.n_fft - self.hop, 0))
        n = (x.shape[-1] - self.n_fft) // self.hop + 1
        if n <= 0:
            return x.new_zeros(x.shape[0], self.fb.shape[0], 0)
        return self._frames(x[..., :(n - 1) * self.hop + self.n_fft])

    def init_state(self, batch, device=None, dtype=None):
        return torch.zeros(batch, self.n_fft - self.hop, device=device, dtype=dtype)

    def step(self, x, state):
        buf = torch.cat([state, x], -1)
        n = (buf.shape[-1] - self.n_fft) // self.hop + 1 if buf.shape[-1] >= self.n_fft else 0
        if n == 0:
            return x.new_zeros(x.shape[0], self.fb.shape[0], 0), buf
        return self._frames(buf[..., :(n - 1) * self.hop + self.n_fft]), buf[..., n * self.hop:]


# -- encoder / decoder -------------------------------------------------------------------------
class Encoder(nn.Module):
    """log-mel (100 Hz) -> conv + ConvNeXt -> stride-2 causal convs (to 12.5 Hz) -> ConvNeXt
    -> (mean, logvar) [B, latent_dim, frames]."""

    def __init__(self, cfg: ISTFTVAEConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.enc_dim
        n_blocks = cfg.enc_blocks_high + cfg.enc_blocks_low
        self.mel = CausalLogMel(cfg)
        self.conv_in = CausalConv1d(cfg.n_mels, d, cfg.in_kernel)
        self.high = nn.ModuleList(ConvNeXtBlock(d, cfg.mlp_mult, cfg.kernel, 1 / n_blocks)
                                  for _ in range(cfg.enc_blocks_high))
        self.down = nn.ModuleList(CausalConv1d(d, d, 2 * s, stride=s) for s in cfg.downsample)
        self.low = nn.ModuleList(ConvNeXtBlock(d, cfg.mlp_mult, cfg.kernel, 1 / n_blocks)
                                 for _ in range(cfg.enc_blocks_low))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 2 * cfg.latent_dim)

    def _head(self, h):
        m, lv = self.out(self.norm(h.transpose(1, 2))).transpose(1, 2).chunk(2, dim=1)
        return m, lv.clamp(self.cfg.logvar_min, self.cfg.logvar_max)

    def forward(self, x):
        """x [B, T] -> mean, logvar [B, C, floor(T / frame_size)]."""
        h = self.conv_in(self.mel(x))
        for b in self.high:
            h = b(h)
        for d in self.down:
            h = d(F.gelu(h))
        for b in self.low:
            h = b(h)
        return self._head(h)

    def init_state(self, batch, device=None, dtype=None) -> State:
        st = {"mel": self.mel.init_state(batch, device, dtype),
              "conv_in": self.conv_in.init_state(batch, device, dtype)}
        for i, b in enumerate(self.high):
            st[f"high{i}"] = b.dw.init_state(batch, device, dtype)
        for i, d in enumerate(self.down):
            st[f"down{i}"] = d.init_state(batch, device, dtype)
        for i, b in enumerate(self.low):
            st[f"low{i}"] = b.dw.init_state(batch, device, dtype)
        return st

    def step(self, x, state: State):
        st = dict(state)
        h, st["mel"] = self.mel.step(x, st["mel"])
        h, st["conv_in"] = self.conv_in.step(h, st["conv_in"])
        for i, b in enumerate(self.high):
            h, st[f"high{i}"] = b.step(h, st[f"high{i}"])
        for i, d in enumerate(self.down):
            h, st[f"down{i}"] = d.step(F.gelu(h), st[f"down{i}"])
        for i, b in enumerate(self.low):
            h, st[f"low{i}"] = b.step(h, st[f"low{i}"])
        m, lv = self._head(h)
        return m, lv, st


class Decoder(nn.Module):
    """latents (12.5 Hz) -> causal conv -> transposed conv x8 (100 Hz) -> causal ConvNeXt
    -> log-magnitude + phase of n_fft frames -> iSTFT by overlap-add -> [B, 240 x frames]."""

    def __init__(self, cfg: ISTFTVAEConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dec_dim
        self.n_bins = cfg.n_fft // 2 + 1
        self.conv_in = CausalConv1d(cfg.latent_dim, d, cfg.in_kernel)
        # kernel == stride: each latent frame becomes `upsample` frames, no overlap, so the
        # upsampler needs no streaming state and stays causal.
        self.up = nn.ConvTranspose1d(d, d, cfg.upsample, stride=cfg.upsample)
        self.blocks = nn.ModuleList(ConvNeXtBlock(d, cfg.mlp_mult, cfg.kernel, 1 / cfg.dec_blocks)
                                    for _ in range(cfg.dec_blocks))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 2 * self.n_bins)
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        # overlap-added Hann windows at hop n_fft / 4 sum to n_fft / (2 hop) = 2: unit gain
        self.gain = 2.0 * cfg.hop / cfg.n_fft

    def frames(self, h):
        """Hidden [B, d, F] -> windowed time-domain frames [B, F, n_fft]."""
        if h.shape[-1] == 0:  # MKL's FFT rejects empty batches
            return h.new_zeros(h.shape[0], 0, self.cfg.n_fft)
        o = self.out(self.norm(h.transpose(1, 2)))
        logmag, phase = o[..., :self.n_bins], o[..., self.n_bins:]
        mag = torch.exp(logmag.clamp(max=self.cfg.log_mag_max))
        spec = torch.polar(mag, phase)
        return torch.fft.irfft(spec, n=self.cfg.n_fft, dim=-1) * self.window

    def _ola(self, frames):
        """[B, F, n_fft] -> [B, (F - 1) hop + n_fft], overlap-added, scaled to unit gain."""
        b, f, n = frames.shape
        if f == 0:
            return frames.new_zeros(b, n - self.cfg.hop)
        y = F.fold(frames.transpose(1, 2), output_size=(1, (f - 1) * self.cfg.hop + n),
                   kernel_size=(1, n), stride=(1, self.cfg.hop))
        return y.reshape(b, -1) * self.gain

    def forward(self, z):
        """z [B, C, J] -> audio [B, J x frame_size] (lagging the encoder input by delay)."""
        h = self.up(self.conv_in(z))
        for b in self.blocks:
            h = b(h)
        y = self._ola(self.frames(h))
        return y[..., :h.shape[-1] * self.cfg.hop]

    def init_state(self, batch, device=None, dtype=None) -> State:
        st = {"conv_in": self.conv_in.init_state(batch, device, dtype)}
        for i, b in enumerate(self.blocks):
            st[f"block{i}"] = b.dw.init_state(batch, device, dtype)
        st["ola"] = torch.zeros(batch, self.cfg.n_fft - self.cfg.hop, device=device, dtype=dtype)
        return st

    def step(self, z, state: State):
        st = dict(state)
        h, st["conv_in"] = self.conv_in.step(z, st["conv_in"])
        h = self.up(h) if h.shape[-1] else h.new_zeros(h.shape[0], self.cfg.dec_dim, 0)
        for i, b in enumerate(self.blocks):
            h, st[f"block{i}"] = b.step(h, st[f"block{i}"])
        n_out = h.shape[-1] * self.cfg.hop
        y = self._ola(self.frames(h))
        tail = st["ola"]
        y = torch.cat([y[..., :tail.shape[-1]] + tail, y[..., tail.shape[-1]:]], -1)
        st["ola"] = y[..., n_out:]
        return y[..., :n_out], st


class ISTFTVAE(nn.Module):
    """Encoder + decoder; see the module docstring for the time alignment."""

    def __init__(self, cfg: ISTFTVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg or ISTFTVAEConfig()
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)

    # -- the codec protocol shared with codec.vae.VAE (what TTS, the engine, the latent
    # cache and the servers call): audio [B, 1, T], latents [B, frames, latent_dim].
    def _check_wav(self, wav):
        if not isinstance(wav, torch.Tensor) or wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"audio must be a [B, 1, T] tensor, got "
                             f"{tuple(wav.shape) if isinstance(wav, torch.Tensor) else type(wav).__name__}")
        if wav.shape[-1] == 0:
            raise ValueError("empty audio")
        if not torch.isfinite(wav).all():
            raise ValueError("audio holds NaN or Inf")

    def _check_latents(self, z):
        if (not isinstance(z, torch.Tensor) or z.dim() != 3 or z.shape[-1] != self.cfg.latent_dim
                or z.shape[1] == 0):
            raise ValueError(f"latents must be [B, frames >= 1, {self.cfg.latent_dim}], got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        if not torch.isfinite(z).all():
            raise ValueError("latents hold NaN or Inf")

    def pad(self, wav):
        """Zero-pad the end to whole frames (the last partial frame is kept)."""
        return F.pad(wav, (0, -wav.shape[-1] % self.cfg.frame_size))

    def encode(self, wav, state: "ISTFTState | None" = None, sample: bool = False,
               generator=None):
        """wav [B, 1, T] -> latents [B, floor(T / frame_size), latent_dim]: the posterior
        mean, or a sample with ``sample=True``; with ``state``, a streaming chunk."""
        self._check_wav(wav)
        if state is not None:
            if sample:
                raise ValueError("streaming encode returns the mean; sample offline")
            if not state.enc:
                state.enc = self.encoder.init_state(state.batch, wav.device, wav.dtype)
            mean, _, state.enc = self.encoder.step(wav[:, 0], state.enc)
            return mean.transpose(1, 2)
        mean, logvar = self.encoder(wav[:, 0])
        if sample:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                              device=mean.device)
            mean = mean + torch.exp(0.5 * logvar) * eps
        return mean.transpose(1, 2)

    def posterior(self, x):
        """x [B, T] or [B, 1, T] -> (mean, logvar) [B, latent_dim, T // frame_size]."""
        return self.encoder(_mono(x))

    def decode(self, latents, state: "ISTFTState | None" = None):
        """latents [B, J, latent_dim] -> audio [B, 1, J x frame_size] (lagging the encoded
        audio by ``cfg.delay`` samples); with ``state``, one streaming chunk."""
        self._check_latents(latents)
        z = latents.transpose(1, 2)
        if state is None:
            return self.decoder(z)[:, None]
        if latents.shape[0] != state.batch:
            raise ValueError(f"state holds {state.batch} streams, latents have "
                             f"{latents.shape[0]}")
        if not state.dec:
            state.dec = self.decoder.init_state(state.batch, z.device, z.dtype)
        y, state.dec = self.decoder.step(z, state.dec)
        return y[:, None]

    def init_state(self, batch: int) -> "ISTFTState":
        """Fresh streaming state for ``batch`` streams (one for encoding, another for
        decoding)."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        return ISTFTState(batch)

    def encode_step(self, wav, state: "ISTFTState"):
        return self.encode(wav, state)

    def decode_step(self, latents, state: "ISTFTState"):
        return self.decode(latents, state)

    # -- training ----------------------------------------------------------------------------
    def forward(self, x, sample: bool = True, latent_noise: float = 0.0):
        """Training pass: (audio [B, J x frame_size], mean, logvar)."""
        mean, logvar = self.posterior(x)
        z = mean
        if sample:
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        if latent_noise > 0:
            z = z + latent_noise * torch.randn_like(z)
        return self.decoder(z), mean, logvar

    def align(self, y, x):
        """(decoded, input) cut to the same samples: y[delay:] reconstructs x[:-delay]."""
        x, y = _mono(x), _mono(y)
        d = self.cfg.delay
        n = min(y.shape[-1], x.shape[-1]) - d
        return y[..., d:d + n], x[..., :n]


class ISTFTState:
    """Streaming state of one direction: the encoder's or the decoder's dict of tensors
    (made at the first chunk, so it takes that chunk's device and dtype). Every decoder
    tensor is batch-first and starts at zero, so ``tensors`` can be gathered and scattered
    by row like ``VAEState.tensors`` (runtime.decode_slots)."""

    def __init__(self, batch: int):
        self.batch = batch
        self.enc: State = {}
        self.dec: State = {}

    @property
    def tensors(self) -> State:
        return self.dec

    @tensors.setter
    def tensors(self, d: State) -> None:
        self.dec = d


def _mono(x):
    return x[:, 0] if x.dim() == 3 else x


# -- losses ------------------------------------------------------------------------------------
_FB_CACHE: dict = {}


def _stft_mag(x, n_fft, hop):
    w = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)
    return torch.stft(x, n_fft, hop, window=w, return_complex=True).abs()


def multi_res_mel_loss(y, x, sample_rate: int, resolutions) -> torch.Tensor:
    """Mean over resolutions of L1 between log-mels (log(mel + 1e-5))."""
    total = 0.0
    for n_fft, hop, n_mels in resolutions:
        key = (sample_rate, n_fft, n_mels, x.device, x.dtype)
        if key not in _FB_CACHE:
            _FB_CACHE[key] = torch.from_numpy(
                mel_filterbank(sample_rate, n_fft, n_mels)).to(x.device, x.dtype)
        fb = _FB_CACHE[key]
        my = torch.matmul(fb, _stft_mag(y, n_fft, hop) ** 2)
        mx = torch.matmul(fb, _stft_mag(x, n_fft, hop) ** 2)
        total = total + (torch.log(my + 1e-5) - torch.log(mx + 1e-5)).abs().mean()
    return total / len(resolutions)


def multi_res_stft_loss(y, x, resolutions) -> torch.Tensor:
    """Mean over resolutions of spectral convergence + log-magnitude L1 (auraloss style)."""
    total = 0.0
    for n_fft, hop in resolutions:
        sy, sx = _stft_mag(y, n_fft, hop), _stft_mag(x, n_fft, hop)
        sc = torch.linalg.norm(sy - sx) / torch.linalg.norm(sx).clamp_min(1e-7)
        mag = (torch.log(sy.clamp_min(1e-7)) - torch.log(sx.clamp_min(1e-7))).abs().mean()
        total = total + sc + mag
    return total / len(resolutions)


def kl_per_element(mean, logvar) -> torch.Tensor:
    """KL(q || N(0, 1)) averaged over every (batch, dim, frame): nats / dim / frame."""
    return 0.5 * (mean ** 2 + torch.exp(logvar) - 1.0 - logvar).mean()


def vae_loss(model: ISTFTVAE, x, loss_cfg: ISTFTVAELossConfig, kl_weight: float | None = None):
    """One training loss on a batch of audio x [B, T]; returns a dict of scalars (tensors)
    with "loss" the total to backpropagate."""
    kl_weight = loss_cfg.kl_weight if kl_weight is None else kl_weight
    y, mean, logvar = model(x, sample=True, latent_noise=loss_cfg.latent_noise)
    y, xt = model.align(y, x)
    mel = multi_res_mel_loss(y, xt, model.cfg.sample_rate, loss_cfg.mel_resolutions)
    stft = multi_res_stft_loss(y, xt, loss_cfg.stft_resolutions)
    kl = kl_per_element(mean, logvar)
    loss = loss_cfg.mel_weight * mel + loss_cfg.stft_weight * stft + kl_weight * kl
    return {"loss": loss, "mel": mel, "stft": stft, "kl": kl}


@dataclass
class KLController:
    """Multiplicative controller that holds the KL near ``target`` nats/dim/frame:
    log(weight) += rate * (kl - target), clipped to [lo, hi]. Its state is two floats, saved
    in checkpoints."""
    weight: float = 2e-2
    target: float = 1.5
    rate: float = 0.01
    lo: float = 1e-4
    hi: float = 1.0

    def update(self, kl: float) -> float:
        w = math.log(self.weight) + self.rate * (kl - self.target)
        self.weight = float(min(max(math.exp(w), self.lo), self.hi))
        return self.weight

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)
