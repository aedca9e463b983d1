"""Model shapes as frozen dataclasses, and the named presets.

A preset fixes every shape a checkpoint depends on; run-time choices (temperature, CFG scale,
steps) live in ``calm_fast.runtime.generate.Request``. ``preset(name)`` returns one by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class TransformerConfig:
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # GQA; None = num_heads
    ffn_mult: float = 4.0
    max_period: float = 10_000.0
    layer_scale: float | None = None  # init value of the per-channel residual scales

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of {self.num_heads} heads")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"{self.num_heads} heads are not a multiple of {self.kv_heads} kv heads")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def dim_feedforward(self) -> int:
        return int(self.d_model * self.ffn_mult)


@dataclass(frozen=True)
class HeadConfig:
    """The AdaLN residual-MLP head. ``kind``: "lsd" (flow map, two times s, t: Pocket TTS)
    or "consistency" (TrigFlow, one time t: the paper's speech and music models)."""

    width: int
    depth: int
    kind: str = "lsd"

    def __post_init__(self):
        if self.kind not in ("lsd", "consistency"):
            raise ValueError(f"head kind must be 'lsd' or 'consistency', got {self.kind!r}")

    @property
    def num_time_conds(self) -> int:
        return 2 if self.kind == "lsd" else 1


@dataclass(frozen=True)
class ShortContextConfig:
    """The short-context Transformer over the last ``context`` clean latents (music)."""

    context: int = 10
    transformer: TransformerConfig = field(
        default_factory=lambda: TransformerConfig(d_model=256, num_layers=2, num_heads=4))


@dataclass(frozen=True)
class CALMConfig:
    name: str
    backbone: TransformerConfig
    head: HeadConfig
    latent_dim: int = 32
    frame_rate: float = 12.5
    text_bins: int | None = 4000  # SentencePiece vocabulary (LUT has one more row: padding)
    voice: bool = True  # voice-prompt projection (latents -> d_model)
    music_tags: tuple[str, ...] = ()  # tag vocabulary of the music conditioner
    short_context: ShortContextConfig | None = None
    vp_noise: bool = False  # variance-preserving noise on the backbone's inputs (training)
    max_context: int = 4096  # rows (prefix + frames) one stream may hold
    # Voice prompts are cut to their first this many frames (0: no limit): a small model
    # trained on prompts of one length does not generalise to much longer ones.
    max_voice_frames: int = 0
    # Text as aligned frame rows (model/aligned_text.py) instead of prefix rows: phoneme
    # durations place the text on the time axis; the frame count follows from them.
    aligned_text: bool = False
    # A learnt row before the voice (Pocket TTS's insert_bos_before_voice; english_2026-01
    # was trained without it): the first prefix row, and the null prefix of latent CFG.
    bos_before_voice: bool = True
    # Channels of the voice features the speaker projection reads (0: latent_dim). The
    # first Pocket TTS (english_2026-01) conditions on its Mimi encoder's 512-dim output.
    voice_dim: int = 0

    def __post_init__(self):
        if self.latent_dim < 1 or self.max_context < 2:
            raise ValueError("latent_dim must be >= 1 and max_context >= 2")
        if self.aligned_text and not self.text_bins:
            raise ValueError("aligned_text needs a text vocabulary (text_bins)")

    @property
    def prompt_dim(self) -> int:
        """Channels of a voice prompt's features (CALM.prefix's ``voice``)."""
        return self.voice_dim or self.latent_dim

    def with_(self, **kw) -> "CALMConfig":
        return replace(self, **kw)


def _tiny() -> CALMConfig:
    return CALMConfig("tiny", TransformerConfig(64, 2, 4), HeadConfig(32, 2), latent_dim=8,
                      text_bins=64, max_context=512)


def _tiny_music() -> CALMConfig:
    return CALMConfig(
        "tiny_music", TransformerConfig(64, 2, 4), HeadConfig(32, 2, "consistency"),
        latent_dim=8, text_bins=None, voice=False,
        music_tags=("genre:classical", "genre:jazz", "instrument:piano", "instrument:strings",
                    "tempo:slow", "tempo:fast"),
        short_context=ShortContextConfig(4, TransformerConfig(32, 2, 2)), vp_noise=True,
        max_context=512)


def _pocket() -> CALMConfig:
    # Pocket TTS English (pocket_tts/config/english.yaml): 6 x 1024, 16 heads, FFN x4,
    # LSD head 6 x 512, 32-dim Mimi latents, SentencePiece LUT of 4000 entries.
    return CALMConfig("pocket", TransformerConfig(1024, 6, 16), HeadConfig(512, 6))


def _paper_tts() -> CALMConfig:
    # The 24-layer teacher the Pocket TTS student is distilled from (paper Table 14).
    return CALMConfig("paper_tts", TransformerConfig(1024, 24, 16), HeadConfig(512, 6))


def _music() -> CALMConfig:
    # Paper music model: backbone 1536 x 48 (24 heads), short-context 4 x 1536 over K=10,
    # consistency head of 12 blocks (~601M: width 3072 by 5 w^2 per block), VP noise.
    return CALMConfig(
        "music", TransformerConfig(1536, 48, 24), HeadConfig(3072, 12, "consistency"),
        text_bins=None, voice=False,
        music_tags=("genre:classical", "genre:jazz", "genre:pop", "genre:rock",
                    "instrument:piano", "instrument:strings", "instrument:guitar",
                    "instrument:drums", "tempo:slow", "tempo:medium", "tempo:fast"),
        short_context=ShortContextConfig(10, TransformerConfig(1536, 4, 24)), vp_noise=True,
        max_context=8192)


PRESETS = {"tiny": _tiny, "tiny_music": _tiny_music, "pocket": _pocket,
           "paper_tts": _paper_tts, "music": _music}


def preset(name: str) -> CALMConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()
