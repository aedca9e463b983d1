"""Audio out: float chunks -> the bytes of a response format, incrementally.

    enc = encoder("mp3", sample_rate=24000)       # wav | pcm | mp3 | opus | aac | flac
    for chunk in chunks: yield enc.write(chunk)   # bytes ready so far (may be b"")
    yield enc.close()

``wav`` streams with an open-ended header (RIFF and data sizes 0xFFFFFFFF, as streaming TTS
servers do; players read to the end), ``pcm`` is raw signed 16-bit little-endian mono; the
others are encoded by FFmpeg through PyAV (``av``): mp3 (libmp3lame), opus (in Ogg), aac (in
ADTS), flac. ``Tempo`` changes speed without changing pitch (FFmpeg's atempo), chunk by
chunk. Samples are clipped to [-1, 1] only at the 16-bit conversion.
"""
from __future__ import annotations

import struct

import numpy as np

FORMATS = ("wav", "pcm", "mp3", "opus", "aac", "flac")
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/L16", "mp3": "audio/mpeg",
               "opus": "audio/ogg; codecs=opus", "aac": "audio/aac", "flac": "audio/flac"}
_AV = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"), "aac": ("adts", "aac"),
       "flac": ("flac", "flac")}
_STD_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


def wav_header(sample_rate: int, frames: int | None = None, channels: int = 1) -> bytes:
    """A 44-byte PCM16 WAV header; ``frames=None``: open-ended (sizes 0xFFFFFFFF)."""
    data = 0xFFFFFFFF if frames is None else frames * 2 * channels
    riff = 0xFFFFFFFF if frames is None else 36 + data
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * 2 * channels,
                        2 * channels, 16) + b"data" + struct.pack("<I", data))


def to_pcm16(x: np.ndarray) -> bytes:
    return (np.clip(np.asarray(x, np.float32), -1.0, 1.0) * 32767.0).round().astype(
        "<i2").tobytes()


def av_available(fmt: str) -> str | None:
    """None when ``fmt`` can be encoded here, else why not."""
    if fmt in ("wav", "pcm"):
        return None
    if fmt not in _AV:
        return f"unknown format {fmt!r}"
    try:
        import av
    except ImportError:
        return f"{fmt} needs PyAV (pip install av)"
    try:
        av.codec.Codec(_AV[fmt][1], "w")
    except Exception as e:  # noqa: BLE001 -- an FFmpeg build without that encoder
        return f"this FFmpeg build has no {_AV[fmt][1]} encoder ({e})"
    return None


class _Raw:
    def __init__(self, fmt: str, sample_rate: int):
        self.head = wav_header(sample_rate) if fmt == "wav" else b""

    def write(self, x: np.ndarray) -> bytes:
        out, self.head = self.head + to_pcm16(x), b""
        return out

    def close(self) -> bytes:
        out, self.head = self.head, b""
        return out


class _Sink:
    def __init__(self):
        self.buf = bytearray()

    def write(self, b) -> int:
        self.buf += b
        return len(b)

    def take(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


class _AVEncoder:
    def __init__(self, fmt: str, sample_rate: int, bitrate: int | None = None, file=None):
        import av

        why = av_available(fmt)
        if why:
            raise ValueError(why)
        container, codec = _AV[fmt]
        if fmt == "opus":
            rate = 48000
        elif fmt == "flac":
            rate = sample_rate
        else:
            rate = next((r for r in _STD_RATES if r >= sample_rate), 48000)
        self.sink = _Sink()
        opts = {"page_duration": "20000"} if container == "ogg" else {}
        # a seekable file gets complete headers (FLAC's sample count); a stream, what fits
        self.c = av.open(self.sink if file is None else file, "w", format=container,
                         options=opts)
        self.st = self.c.add_stream(codec, rate=rate)
        self.st.layout = "mono"
        if bitrate and fmt != "flac":
            self.st.bit_rate = bitrate
        fmt_name = self.st.codec_context.format.name if self.st.codec_context.format else "s16"
        self.rs = av.AudioResampler(format=fmt_name, layout="mono", rate=rate)
        self.sr, self.pts, self.av = sample_rate, 0, av

    def _encode(self, frames) -> None:
        for f in frames:
            for p in self.st.encode(f):
                self.c.mux(p)

    def write(self, x: np.ndarray) -> bytes:
        x = np.asarray(x, np.float32)
        if len(x):
            fr = self.av.AudioFrame.from_ndarray(np.clip(x, -1, 1)[None], format="flt",
                                                 layout="mono")
            fr.sample_rate, fr.pts = self.sr, self.pts
            self.pts += len(x)
            self._encode(self.rs.resample(fr))
        return self.sink.take()

    def close(self) -> bytes:
        self._encode(self.rs.resample(None))
        for p in self.st.encode(None):
            self.c.mux(p)
        self.c.close()
        return self.sink.take()


def encoder(fmt: str, sample_rate: int, file=None):
    """An incremental encoder for ``fmt`` (write(float32 chunk) -> bytes, close() -> bytes).
    With ``file`` (a seekable binary file, encoded formats only) the encoder writes there
    itself and returns b"". Raises ValueError naming a format that cannot be encoded."""
    if fmt in ("wav", "pcm"):
        return _Raw(fmt, sample_rate)
    return _AVEncoder(fmt, sample_rate, file=file)


class Tempo:
    """Speed change without pitch change (FFmpeg atempo, chained for factors beyond
    [0.5, 2]), chunk by chunk: process(chunk) -> the samples ready, flush() -> the rest."""

    def __init__(self, speed: float, sample_rate: int):
        import av
        import av.filter

        if not 0.25 <= speed <= 4.0:
            raise ValueError(f"speed must be in [0.25, 4.0], got {speed}")
        self.av, self.sr, self.pts = av, sample_rate, 0
        self.g = av.filter.Graph()
        node = self.g.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono")
        self.src = node
        factors, s = [], speed
        while s > 2.0:
            factors.append(2.0)
            s /= 2.0
        while s < 0.5:
            factors.append(0.5)
            s /= 0.5
        factors.append(s)
        for f in factors:
            nxt = self.g.add("atempo", f"{f:.6f}")
            node.link_to(nxt)
            node = nxt
        sink = self.g.add("abuffersink")
        node.link_to(sink)
        self.g.configure()

    def _pull(self) -> np.ndarray:
        out = []
        while True:
            try:
                f = self.g.pull()
            except (BlockingIOError, self.av.error.EOFError):
                break
            except self.av.error.FFmpegError:
                break
            out.append(f.to_ndarray().reshape(-1).astype(np.float32))
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def process(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if not len(x):
            return np.zeros(0, np.float32)
        fr = self.av.AudioFrame.from_ndarray(x[None], format="flt", layout="mono")
        fr.sample_rate, fr.pts = self.sr, self.pts
        self.pts += len(x)
        self.g.push(fr)
        return self._pull()

    def flush(self) -> np.ndarray:
        self.g.push(None)
        return self._pull()


class Resampler:
    """Streaming rate change (FFmpeg's swresample through PyAV): process(chunk) -> samples
    ready, flush() -> the rest. Identity when the rates are equal."""

    def __init__(self, src: int, dst: int):
        self.src, self.dst, self.pts = src, dst, 0
        if src != dst:
            import av

            self.av = av
            self.rs = av.AudioResampler(format="flt", layout="mono", rate=dst)

    def _cat(self, frames) -> np.ndarray:
        out = [f.to_ndarray().reshape(-1).astype(np.float32) for f in frames]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def process(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if self.src == self.dst or not len(x):
            return x
        fr = self.av.AudioFrame.from_ndarray(x[None], format="flt", layout="mono")
        fr.sample_rate, fr.pts = self.src, self.pts
        self.pts += len(x)
        return self._cat(self.rs.resample(fr))

    def flush(self) -> np.ndarray:
        if self.src == self.dst:
            return np.zeros(0, np.float32)
        return self._cat(self.rs.resample(None))
