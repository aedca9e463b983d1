"""Tokenizers (incl. training our own SentencePiece model) and the conditioners."""
import pytest
import torch

from calm_fast.model.conditioning import (ByteTokenizer, SentencePieceTokenizer, TagConditioner, TextConditioner)

CORPUS = [f"The {a} {b} walks over the {c} bridge at {n} o'clock."
          for n, (a, b, c) in enumerate((a, b, c) for a in ("quick", "slow", "red", "old")
                                       for b in ("fox", "dog", "cat", "man")
                                       for c in ("stone", "wooden", "long"))]


def test_train_a_sentencepiece_model_on_our_text(tmp_path):
    tok = SentencePieceTokenizer.train(CORPUS, vocab_size=60)
    assert 20 < tok.vocab_size <= 60
    ids = tok.encode("The old cat walks over the stone bridge.")
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == "The old cat walks over the stone bridge."
    tok.save(tmp_path / "tok.model")
    again = SentencePieceTokenizer(tmp_path / "tok.model")
    assert again.encode("slow dog") == tok.encode("slow dog")
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        SentencePieceTokenizer(tmp_path / "bad.model")
    with pytest.raises(ValueError, match="no text"):
        SentencePieceTokenizer.train(["", "  "])


def test_text_conditioner_lookup_and_errors():
    cond = TextConditioner(256, 16, ByteTokenizer(), max_tokens=10)
    ids = cond.tokenize(" hi ")
    assert ids.tolist() == [104, 105]
    torch.testing.assert_close(cond(ids), cond.embed.weight[[104, 105]])
    with pytest.raises(ValueError, match="empty text"):
        cond.tokenize("   ")
    with pytest.raises(ValueError, match="12 tokens long"):
        cond.tokenize("a" * 12)
    with pytest.raises(ValueError, match="256 pieces"):
        TextConditioner(100, 16, ByteTokenizer())
    with pytest.raises(ValueError, match="no tokenizer"):
        TextConditioner(100, 16).tokenize("hi")
    with pytest.raises(ValueError, match="token ids"):
        cond(torch.tensor([300]))


def test_tag_conditioner():
    tags = TagConditioner(("genre:jazz", "tempo:fast"), 8)
    torch.testing.assert_close(tags(tags.encode(["tempo:fast"])), tags.embed.weight[1:])
    with pytest.raises(ValueError, match="unknown tag"):
        tags.encode(["genre:polka"])
