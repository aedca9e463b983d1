"""The music conditioner's vocabulary (model/music_tags.py): a manifest row of the music
builder and its own caption give the same tags; user captions in other words are read
for the key, tempo, style and instruments; other vocabularies are served by full tags
and bare words."""
import pytest

from calm_fast.model.music_tags import VOCAB, caption_tags, row_tags, tempo_word

ROW = {"key": "E- major", "bpm": 131, "collection": "oneills1850",
       "instruments": ["pan flute", "cello"], "caption": ""}


def test_vocabulary_is_unique_and_covers_every_key():
    assert len(set(VOCAB)) == len(VOCAB) == 49
    assert sum(t.startswith("tonic:") for t in VOCAB) == 12


def test_a_builder_row_and_its_caption_agree():
    from calm_fast.data.music import caption

    meta = {**ROW, "key": "Eb major", "meter": "6/8", "n_parts": 2}
    tags = row_tags(ROW)  # music21's spelling of the flat: "E-"
    assert row_tags(meta) == tags
    assert tags == ["tonic:D#", "mode:major", "tempo:fast", "style:irish",
                    "instrument:pan flute", "instrument:cello"]
    # 'pan flute' is not also 'flute'; 'Irish folk tune' is not also a European folk song
    assert set(caption_tags(caption(meta))) == set(tags)


@pytest.mark.parametrize("text, want", [
    ("slow piano in a minor", {"tempo:slow", "instrument:piano", "tonic:A", "mode:minor"}),
    ("Fiddle tune, 72 bpm, G# minor, for solo violin",
     {"style:fiddle", "tempo:slow", "tonic:G#", "mode:minor", "instrument:violin"}),
    ("medium accompaniment groove in Bb major",
     {"tempo:medium", "style:accompaniment", "tonic:A#", "mode:major"}),
    ("tonic:C mode:minor", {"tonic:C", "mode:minor"}),
    ("something nobody trained", set()),
])
def test_user_captions(text, want):
    assert set(caption_tags(text)) == want


def test_other_vocabularies_by_full_tag_or_bare_word():
    vocab = ("genre:jazz", "instrument:piano", "tempo:slow")
    assert caption_tags("slow jazz piano", vocab) == vocab
    assert caption_tags("genre:jazz", vocab) == ("genre:jazz",)


def test_tempo_words():
    assert [tempo_word(b) for b in (60, 89.9, 90, 124, 125, 200)] == \
        ["slow", "slow", "medium", "medium", "fast", "fast"]
