"""Sentence sources and splits for the speech builder."""
import pytest

from calm_fast.data import text
from calm_fast.data.tools import MissingToolError, require_tool


def test_clean_sentence_filters():
    assert text.clean_sentence("  Hello   there, old friend.  ") == "Hello there, old friend."
    assert text.clean_sentence("Too short.") is None
    assert text.clean_sentence("It costs 5 dollars to get in.") is None  # digits
    assert text.clean_sentence("The NASA team went home early today.") is None  # acronym
    assert text.clean_sentence(" ".join(["word"] * 26)) is None
    assert text.clean_sentence('He said "no" to all of it.') is None  # quotes


def test_sources_and_disjoint_deterministic_split():
    sents = text.collect(("pydoc",))
    assert len(sents) > 100 and len({s.lower() for s in sents}) == len(sents)
    a = text.split(sents, seed=3)
    b = text.split(sents, seed=3)
    assert a == b
    train, val, test = a
    assert not set(train) & set(test) and not set(val) & set(test)
    assert len(train) + len(val) + len(test) == len(sents)
    assert text.split(sents, seed=4)[2] != test


@pytest.mark.skipif(not __import__("shutil").which("bible"), reason="bible-kjv not installed")
def test_bible_and_fortunes():
    assert any(s.startswith("In the beginning God created") for s in text.bible_sentences())
    assert len(text.fortune_sentences()) > 50


def test_errors():
    with pytest.raises(ValueError, match="unknown text source"):
        text.collect(("nope",))
    with pytest.raises(ValueError, match="no sentences"):
        text.split([])
    with pytest.raises(ValueError, match="fractions"):
        text.split(["a b c d"], val=0.6, test=0.5)
    with pytest.raises(MissingToolError, match="install_data_tools.sh"):
        require_tool("definitely-not-a-real-tool-xyz")
