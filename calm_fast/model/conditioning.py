"""Conditioning: text (tokenizer + lookup table), music tags, and the tokenizers.

The conditioners turn user inputs into rows of model space (d_model), which the model
lays out as a prefix before the BOS latent (``CALM.prefix``):

    [bos_before_voice, voice latents @ speaker_proj^T, tag rows, text rows]

and the null prefix of CFG is ``[bos_before_voice]`` alone (text and voice dropped, as the
released Pocket TTS code does). Tokenizers are not part of the state dict: a checkpoint's
LUT only fixes the vocabulary size, which ``TextConditioner`` checks against the tokenizer.
"""
from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn


class ByteTokenizer:
    """UTF-8 bytes as tokens (256 entries): no training, no files; for tests and tiny runs."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model (the format of Pocket TTS's ``tokenizer.model``)."""

    def __init__(self, model: str | Path | bytes):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            if isinstance(model, bytes):
                self.sp.LoadFromSerializedProto(model)
            else:
                self.sp.Load(str(model))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"not a SentencePiece model: {model if not isinstance(model, bytes) else '<bytes>'}: {e}") from e

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4000, model_type: str = "unigram",
              character_coverage: float = 1.0) -> "SentencePieceTokenizer":
        """Train on our own text, in memory (one thread, all sentences: deterministic). The
        vocabulary may come out smaller than asked when the text is short (``vocab_size``)."""
        import sentencepiece as spm

        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ValueError("cannot train a tokenizer on no text")
        out = io.BytesIO()
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(texts), model_writer=out, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            hard_vocab_limit=False, num_threads=1, minloglevel=2)
        return cls(out.getvalue())

    def __deepcopy__(self, memo):  # immutable once loaded; EMA copies of a model share it
        return self

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(ids)

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.sp.serialized_model_proto())


class TextConditioner(nn.Module):
    """Lookup table of ``n_bins + 1`` rows (the last one is padding), as in Pocket TTS."""

    def __init__(self, n_bins: int, dim: int, tokenizer=None, max_tokens: int = 1024):
        super().__init__()
        self.n_bins, self.max_tokens = n_bins, max_tokens
        self.embed = nn.Embedding(n_bins + 1, dim)
        self.tokenizer = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    def set_tokenizer(self, tokenizer) -> None:
        if tokenizer.vocab_size > self.n_bins:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the lookup table "
                             f"has {self.n_bins} entries")
        self.tokenizer = tokenizer

    def tokenize(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("no tokenizer: pass one to set_tokenizer(), or give token ids")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty text: nothing to say")
        ids = self.tokenizer.encode(text.strip())
        if len(ids) > self.max_tokens:
            raise ValueError(f"text is {len(ids)} tokens long, more than max_tokens="
                             f"{self.max_tokens}; split it into sentences")
        return torch.tensor(ids, dtype=torch.long, device=self.embed.weight.device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.numel() and (tokens.min() < 0 or tokens.max() > self.n_bins):
            raise ValueError(f"token ids must be in [0, {self.n_bins}]")
        return self.embed(tokens)


class TagConditioner(nn.Module):
    """One learned row per music tag (``"genre:jazz"``, ``"tempo:fast"``, ...)."""

    def __init__(self, vocab: tuple[str, ...], dim: int):
        super().__init__()
        self.vocab = tuple(vocab)
        self.index = {t: i for i, t in enumerate(self.vocab)}
        self.embed = nn.Embedding(len(self.vocab), dim)

    def encode(self, tags: Iterable[str]) -> torch.Tensor:
        tags = list(tags)
        unknown = [t for t in tags if t not in self.index]
        if unknown:
            raise ValueError(f"unknown tag(s) {unknown}; known: {list(self.vocab)}")
        return torch.tensor([self.index[t] for t in tags], dtype=torch.long,
                            device=self.embed.weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)
