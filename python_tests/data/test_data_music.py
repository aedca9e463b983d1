"""Music builder: captioned renders from the music21 corpus, deterministic, split by work."""
import json
import shutil

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("music21")
from calm_fast.data import music  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("fluidsynth") is None,
                                reason="fluidsynth not installed (scripts/install_data_tools.sh)")


def test_build_is_deterministic_and_captioned(tmp_path):
    kw = dict(n_renders=3, seed=1, collections=("oneills1850",), max_seconds=4.0,
              mma_fraction=0.0, workers=1)
    m1 = music.build_music_dataset(tmp_path / "a", **kw)
    m2 = music.build_music_dataset(tmp_path / "b", **kw)
    rows = [json.loads(line) for line in m1.read_text().splitlines()]
    assert rows == [json.loads(line) for line in m2.read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        wav, sr = sf.read(tmp_path / "a" / r["path"])
        assert sr == 24_000 and wav.ndim == 1 and 0.5 < len(wav) / sr <= 4.0 + 1e-3
        assert np.abs(wav).max() == pytest.approx(10 ** (-1 / 20), abs=2e-3)
        assert f"{r['bpm']} BPM" in r["caption"] and r["key"] in r["caption"]
        assert all(i in r["caption"] for i in r["instruments"])
        wav2, _ = sf.read(tmp_path / "b" / r["path"])
        np.testing.assert_array_equal(wav, wav2)


@pytest.mark.skipif(shutil.which("mma") is None, reason="mma not installed")
def test_mma_accompaniment(tmp_path):
    import random

    wav, meta = music.render_mma(random.Random(0), max_seconds=3.0)
    assert wav.dtype == np.float32 and 1.0 < len(wav) / 24_000 <= 3.0 + 1e-3
    assert meta["style"] in meta["caption"] and f"{meta['bpm']} BPM" in meta["caption"]
    rows = music.build_music_dataset(tmp_path, n_renders=2, seed=0, collections=("bach",),
                                     max_seconds=2.0, mma_fraction=1.0, workers=1)
    rows = [json.loads(line) for line in rows.read_text().splitlines()]
    assert {r["collection"] for r in rows if r["split"] == "train"} <= {"mma"}


def test_split_is_by_work():
    works = music.list_works(("bach",))
    train, test = music.split_works(works, seed=0)
    assert test and not set(train) & set(test) and len(train) + len(test) == len(works)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_renders"):
        music.build_music_dataset("/tmp/unused", n_renders=0)
    with pytest.raises(ValueError, match="no works"):
        music.build_music_dataset("/tmp/unused-calm", n_renders=1, collections=("nope",),
                                  mma_fraction=0.0)
    with pytest.raises(ValueError, match="mma_fraction"):
        music.build_music_dataset("/tmp/unused-calm", n_renders=1, mma_fraction=2.0)
