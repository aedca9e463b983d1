"""The SEANet decoder on CPU without torch's conv ops: channels-last rows, one C++ kernel.

``vae.SEANetDecoder`` runs [conv, (ELU, transposed conv, residual blocks) x n, ELU, conv].
Through torch that is ~25 separate passes over large activations (1920 rows x 64
channels per frame and stream), on oneDNN convs whose speed varies widely by shape
(benchmarks/results/design_notes.md). Here every conv is one call of ``ops.native().conv_rows`` (csrc/conv_cpu.cpp): an implicit
GEMM over the rows in place, whose store adds the bias and the residual and writes what the
next layer reads, raw (a residual block's skip) and / or through the ELU. A consumer with a
causal context gets its input in a buffer with that many rows reserved in front, which it
fills from its streaming state, so no concatenation is ever made.

A transposed conv (kernel 2S, stride S) is a 2-tap conv over its input rows whose output
row t holds the S samples tS .. tS + S - 1 side by side, i.e. the upsampled signal in
channels-last order. Its first tap reads the row before: a zero row, with the previous
call's tail (kernel - stride output samples, bias excluded, as ``CausalConvTranspose``
keeps it) added to output row 0; the new tail is the last input row through the first tap.

Streaming state is kept exactly as the torch path keeps it (``VAEState.tensors``: a conv's
last input samples [B, C, keep], a transposed conv's tail [B, C_out, S]), so the two paths
can take turns on one stream. Applies to fp32 CPU tensors without autograd when the
extension is built; ``decode`` returns None otherwise (the caller runs torch).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn as nn

from calm_fast.codec.vae import CausalConv, CausalConvTranspose, ResBlock
from calm_fast.fast import ops
from calm_fast.fast.cpu_linear import cached_for, pack_panels


@dataclass
class _Conv:
    """One conv as the kernel sees it: panels [P, taps * cin, 32] of output columns n."""
    mod: nn.Module  # the CausalConv / CausalConvTranspose (its state key)
    panels: torch.Tensor
    bias: torch.Tensor | None
    taps: int
    dil: int
    keep: int  # context rows the input buffer reserves in front
    cin: int
    cout: int
    up: int = 1  # output samples per input row (a transposed conv's stride)
    w_one: torch.Tensor | None = None  # [taps * cin] when cout == 1 (conv_rows_to_one)
    pairs: torch.Tensor | None = None  # two rows at a time: see _call


@dataclass
class _Stage:
    kind: str  # "conv", "up" (transposed conv), "res" (residual block), "out" (last conv)
    convs: list
    raw_out: bool = False  # whether the next stage reads this output raw (a skip)
    next_keep: int = 0  # context rows of the next stage's input buffer


def _conv(m) -> _Conv | None:
    c = m.conv
    if c.groups != 1 or c.padding != (0,) or m.pad_mode != "constant":
        return None
    k, d = c.kernel_size[0], c.dilation[0]
    if c.stride[0] != 1:
        return None
    w = c.weight.detach().float()  # [cout, cin, k] -> [k * cin, cout]
    cout, cin = w.shape[:2]
    flat = w.permute(2, 1, 0).reshape(k * cin, cout)
    bias = None if c.bias is None else c.bias.detach().float().contiguous()
    one = flat[:, 0].contiguous() if cout == 1 else None
    pairs = None
    if k == 3 and d == 1 and cout > 1:  # Winograd F(2, 3) weights: g0, G1, G2, g2
        g0, g1, g2 = flat.split(cin)
        pairs = pack_panels(torch.cat([g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2]))
    return _Conv(m, pack_panels(flat), bias, k, d, m.keep, cin, cout, w_one=one, pairs=pairs)


def _up(m) -> _Conv | None:
    c = m.convtr
    S, k = c.stride[0], c.kernel_size[0]
    if c.groups != 1 or k != 2 * S or c.padding != (0,) or c.output_padding != (0,) \
            or c.dilation != (1,):
        return None
    w = c.weight.detach().float()  # [cin, cout, 2S]
    cin, cout = w.shape[:2]
    prev = w[:, :, S:].permute(0, 2, 1).reshape(cin, S * cout)  # tap 0: the row before
    this = w[:, :, :S].permute(0, 2, 1).reshape(cin, S * cout)  # tap 1: this row
    bias = None if c.bias is None else c.bias.detach().float().contiguous()
    return _Conv(m, pack_panels(torch.cat([prev, this])), bias, 2, 1, 1, cin, cout, up=S,
                 pairs=pack_panels(prev + this))


def _plan(decoder) -> list | None:
    """The decoder's layers as stages, or None if they are not the SEANet pattern."""
    layers = list(decoder.model)
    if len(layers) < 3 or not isinstance(layers[0], CausalConv):
        return None
    stages = [_Stage("conv", [_conv(layers[0])])]
    i = 1
    while i < len(layers):
        m = layers[i]
        if isinstance(m, nn.ELU) and i + 1 < len(layers) and m.alpha == 1.0:
            nxt = layers[i + 1]
            if isinstance(nxt, CausalConvTranspose):
                stages.append(_Stage("up", [_up(nxt)]))
            elif isinstance(nxt, CausalConv) and i + 2 == len(layers):
                stages.append(_Stage("out", [_conv(nxt)]))
            else:
                return None
            i += 2
        elif isinstance(m, ResBlock):
            b = list(m.block)
            if not (len(b) == 4 and isinstance(b[0], nn.ELU) and isinstance(b[2], nn.ELU)
                    and b[0].alpha == b[2].alpha == 1.0 and b[3].keep == 0):
                return None
            stages.append(_Stage("res", [_conv(b[1]), _conv(b[3])]))
            i += 1
        else:
            return None
    if stages[-1].kind != "out" or any(c is None for s in stages for c in s.convs):
        return None
    for s, nxt in zip(stages, stages[1:]):  # what each stage's output must provide
        s.raw_out = nxt.kind == "res"
        s.next_keep = nxt.convs[0].keep
    return stages


class _Workspace:
    """The intermediate buffers, kept from call to call (per thread): a fresh large
    torch.empty is fresh pages from the OS, and faulting them in doubled the time of the
    cheap convs (benchmarks/results/design_notes.md)."""

    def __init__(self):
        self.local = threading.local()

    def get(self, key, *shape) -> torch.Tensor:
        bufs = self.local.__dict__.setdefault("bufs", {})
        n = 1
        for d in shape:
            n *= d
        t = bufs.get(key)
        if t is None or t.numel() < n:
            t = bufs[key] = torch.empty(n)
        return t[:n].view(shape)


def applies(x: torch.Tensor) -> bool:
    return ops.native_ok(x, name="conv_rows")


def decode(decoder, x: torch.Tensor, state=None) -> torch.Tensor | None:
    """``decoder(x, state)`` for x [B, C, T]: wav [B, channels, T * hop]; None when the fast
    path does not apply (see the module docstring)."""
    if not applies(x):
        return None
    stages = cached_for(decoder, "_fast_plan", list(decoder.parameters()),
                        lambda: _plan(decoder))
    if stages is None:
        return None
    ws = decoder.__dict__.setdefault("_fast_ws", _Workspace())
    tensors = None if state is None else state.tensors
    B, C, T = x.shape
    first = stages[0].convs[0]
    buf = ws.get("in", B, first.keep + T, C)
    buf[:, first.keep:] = x.transpose(1, 2)
    raw = None
    for i, s in enumerate(stages):
        if s.kind == "out":
            return _out(s.convs[0], buf, T, tensors)
        if s.kind == "res":
            c3, c1 = s.convs
            _fill_context(c3, buf, tensors)
            hid = ws.get(("hid", i), B, T, c3.cout)
            _call(c3, buf, T, e=hid)
            buf, raw = _call_next(ws, i, s, c1, hid, T, res=raw)
        elif s.kind == "up":
            c = s.convs[0]
            buf[:, 0].zero_()  # the row before the first: its part comes as the tail
            tail = None if tensors is None else tensors.get(c.mod)
            add0 = None if tail is None else \
                tail.transpose(1, 2).reshape(B, c.up * c.cout).contiguous()
            if tensors is not None:  # the next call's tail: the last row through tap 0
                new = torch.empty(B, 1, c.up * c.cout)
                ops.native().conv_rows(buf[:, T:T + 1].numpy(), c.panels.numpy(), 1, 1, 1, None, None,
                             None, new.numpy(), None, None, torch.get_num_threads())
                tensors[c.mod] = new.view(B, c.up, c.cout).transpose(1, 2).contiguous()
            buf, raw = _call_next(ws, i, s, c, buf, T, add0=add0)
            T *= c.up
        else:  # the first conv
            _fill_context(first, buf, tensors)
            buf, raw = _call_next(ws, i, s, first, buf, T)
    raise AssertionError("the plan ends with an 'out' stage")


def _fill_context(c: _Conv, buf: torch.Tensor, tensors) -> None:
    """The first ``keep`` rows of the input buffer: the stream's previous input samples
    (zeros at the start or offline); then saves the last ``keep`` rows as the new state."""
    if c.keep == 0:
        return
    prev = None if tensors is None else tensors.get(c.mod)
    if prev is None:
        buf[:, :c.keep].zero_()
    else:
        buf[:, :c.keep] = prev.transpose(1, 2)
    if tensors is not None:
        tensors[c.mod] = buf[:, -c.keep:].transpose(1, 2).contiguous()


def _call(c: _Conv, buf, T, y=None, e=None, res=None, add0=None) -> None:
    """y / e [B, T, cout] (or [B, T * up, cout]) from the input buffer. Over an even T, a
    transposed conv goes two rows at a time with 3/4 of the multiplies (Winograd F(2, 2)),
    and a 3-tap conv at dilation 1 with 2/3 (F(2, 3))."""
    B = buf.shape[0]
    rows = lambda t: None if t is None else t.view(B, T, c.up * c.cout).numpy()  # noqa: E731
    pairs = c.pairs is not None and T % 2 == 0
    ops.native().conv_rows(buf.numpy(), c.panels.numpy(), c.taps, c.dil, T,
                 None if c.bias is None else c.bias.numpy(),
                 None if add0 is None else add0.numpy(), rows(res), rows(y), rows(e),
                 c.pairs.numpy() if pairs else None, torch.get_num_threads())


def _call_next(ws: _Workspace, i: int, s: _Stage, c: _Conv, buf, T, res=None, add0=None):
    """Run conv ``c`` of stage ``s`` (the i-th): returns (the next stage's input buffer,
    with its context rows free, the raw output or None)."""
    B, To = buf.shape[0], T * c.up
    nxt = ws.get(("next", i), B, s.next_keep + To, c.cout)
    raw = ws.get(("raw", i), B, To, c.cout) if s.raw_out else None
    _call(c, buf, T, y=raw, e=nxt[:, s.next_keep:], res=res, add0=add0)
    return nxt, raw


def _out(c: _Conv, buf, T, tensors) -> torch.Tensor:
    _fill_context(c, buf, tensors)
    B = buf.shape[0]
    if c.w_one is not None:
        y = torch.empty(B, T)
        bias = 0.0 if c.bias is None else float(c.bias[0])
        ops.native().conv_rows_to_one(buf.numpy(), c.w_one.numpy(), bias, c.taps, c.dil, T, y.numpy(),
                            torch.get_num_threads())
        return y[:, None]
    y = torch.empty(B, T, c.cout)
    _call(c, buf, T, y=y)
    return y.transpose(1, 2)
