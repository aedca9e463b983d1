"""The phoneme front end: dictionary words, inflections of known words, spelled unknown
words, numbers read out, punctuation kept, ids stable."""
import pytest

from calm_fast.model.phonemes import (SYMBOLS, PhonemeTokenizer, normalize, number_words,
                                      word_phones)


def test_dictionary_inflection_and_spelling():
    assert word_phones("hello") == ["HH", "AH0", "L", "OW1"]
    # KJV -eth on a stem with a doubled consonant: stir + eth
    assert word_phones("stirreth") == word_phones("stir") + ["AH0", "TH"]
    assert word_phones("lord's") == ["L", "AO1", "R", "D", "Z"]
    assert word_phones("xqzt") == ["<x>", "<q>", "<z>", "<t>"]


def test_numbers_and_normalisation():
    assert number_words(0) == "zero" and number_words(115) == "one hundred fifteen"
    assert number_words(2026) == "two thousand twenty six"
    assert number_words(3_000_000) == "three million"
    assert number_words(10 ** 13) == " ".join(["one"] + ["zero"] * 13)
    assert normalize("It's 42 \u2014 no?") == ["it's", "forty", "two", "-", "no", "?"]


def test_ids_words_and_punctuation():
    t = PhonemeTokenizer()
    ids = t.encode("Hello there, friend.")
    assert t.decode(ids) == "HH AH0 L OW1 | DH EH1 R , | F R EH1 N D ."
    assert all(0 <= i < t.vocab_size for i in ids) and t.vocab_size == len(SYMBOLS)
    assert t.encode("") == [] and t.encode("!!") == [SYMBOLS.index("!")] * 2
    # the id table is part of every trained model: its head must never move
    assert SYMBOLS[:3] == [" ", ".", ","] and SYMBOLS.index("AA0") == 11


@pytest.mark.parametrize("text", ["naïve café", "emoji 🎉 here", "tab\tand\nnewline"])
def test_any_unicode_text_encodes(text):
    ids = PhonemeTokenizer().encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
