"""Offline evaluation of generated audio (``calm-fast eval``): intelligibility (asr),
speaker similarity (speaker), round-trip signal metrics (signal), a MOS proxy (quality),
music agreement (music), and the runner that scores a manifest (report)."""
from calm_fast.evaluate.asr import (WHISPER_TINY_EN_SHA256, WhisperASR, cer, char_errors,
                                    normalize_text, wer, word_errors)

__all__ = ["WHISPER_TINY_EN_SHA256", "WhisperASR", "cer", "char_errors", "normalize_text",
           "wer", "word_errors"]
