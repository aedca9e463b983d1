"""calm_fast.serve.batch: a manifest as a resumable job through one Engine. A row's audio
depends only on its own seed (not on its place, its neighbours, bad rows, the batch width);
bad rows are recorded and skipped; a re-run after a kill redoes only the unfinished rows;
the in-flight window bounds memory; the command's exit codes."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from calm_fast.codec.vae import VAE, vae_preset
from calm_fast.model.conditioning import ByteTokenizer
from calm_fast.model.calm import CALM
from calm_fast.model.config import preset
from calm_fast.runtime.export import export_model
from calm_fast.serve import batch as B
from golden import perturbed

OPTS = dict(eos_threshold=None, progress=False, cache_mb=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    torch.manual_seed(0)
    export_model(d / "lm.safetensors",
                 perturbed(CALM(preset("tiny").with_(text_bins=256), ByteTokenizer())))
    export_model(d / "music.safetensors", perturbed(CALM(preset("tiny_music"))))
    export_model(d / "vae.safetensors", VAE(vae_preset("tiny")))
    t = np.arange(1600) / 1600  # 1 s at the tiny VAE's 1.6 kHz
    sf.write(d / "voice.wav", (0.3 * np.sin(2 * np.pi * 50 * t)).astype("float32"), 1600)
    sf.write(d / "voice2.wav", (0.3 * np.sin(2 * np.pi * 80 * t)).astype("float32"), 1600)
    sf.write(d / "prompt.wav", (0.2 * np.sin(2 * np.pi * 30 * t[:800])).astype("float32"), 1600)
    return d


def good_rows():
    rows = [{"id": f"a{i}", "text": f"row number {i}", "max_seconds": 0.25 + 0.25 * (i % 3)}
            for i in range(9)]
    rows[1].update(voice="voice.wav")
    rows[2].update(voice="voice.wav", seed=7, temperature=0.5)
    rows[3].update(voice="voice2.wav", cfg=1.5)
    rows[4].update(steps=2, format="flac")
    rows[5].update(prompt="prompt.wav")
    rows[6].update(text=None, prompt="prompt.wav")
    del rows[6]["text"]
    return rows


BAD = [("{not json", "not JSON"),
       ({"id": "b1", "text": "x", "colour": "red"}, "unknown field(s) ['colour']"),
       ({"id": "b2"}, "needs one of text, prompt or caption"),
       ({"id": "b3", "text": "x", "voice": "missing.wav"}, "no audio file"),
       ({"id": "b4", "text": "x", "seed": -1}, "seed must be an integer >= 0"),
       ({"id": "../b5", "text": "x"}, "id must be"),
       ({"id": "a8", "text": "again"}, "duplicate id"),  # a8 comes first
       ({"id": "b6", "text": "x", "format": "aiff"}, "format must be one of"),
       ({"id": "b7", "text": "x", "max_seconds": 100}, "exceed the context")]


def write_manifest(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def run(files, manifest, out, **kw):
    return B.run_batch(manifest, out, checkpoint=files / "lm.safetensors",
                       vae=files / "vae.safetensors", **{**OPTS, **kw})


def audio(path):
    return sf.read(str(path), dtype="float32", always_2d=True)[0]


def results(out):
    """id -> record (an ok record wins over a later duplicate-id error)."""
    got = {}
    for r in map(json.loads, open(out / "results.jsonl")):
        if got.get(r["id"], {}).get("status") != "ok":
            got[r["id"]] = r
    return got


def test_rows_depend_only_on_their_own_seed(files, tmp_path):
    """The same rows alone-ish (1 stream), 3 at a time, and reversed with bad rows between
    them at 2 streams: the same audio, frames, seconds and seeds for every good row."""
    rows = good_rows()
    m1 = write_manifest(files / "m1.jsonl", rows)
    mixed = []
    for r, (bad, _) in zip(reversed(rows), BAD):
        mixed += [r, bad]
    m2 = write_manifest(files / "m2.jsonl", mixed)
    s1 = run(files, m1, tmp_path / "one", max_streams=1)
    s3 = run(files, m1, tmp_path / "three", max_streams=3)
    s2 = run(files, m2, tmp_path / "mixed", max_streams=2, window=3)
    assert (s1["ok"], s1["failed"]) == (s3["ok"], s3["failed"]) == (len(rows), 0)
    assert (s2["ok"], s2["failed"]) == (len(rows), len(BAD))
    r1, r3, r2 = (results(tmp_path / d) for d in ("one", "three", "mixed"))
    for r in rows:
        a = r1[r["id"]]
        assert a["status"] == "ok" and a["seed"] == (r.get("seed") or B.default_seed(r["id"], 0))
        fmt = r.get("format", "wav")
        assert a["output"] == f"{r['id']}.{fmt}"
        ref = audio(tmp_path / "one" / a["output"])
        assert ref.shape[0] == round(a["seconds"] * 1600) > 0
        for other, d in ((r3, "three"), (r2, "mixed")):
            b = other[r["id"]]
            assert {k: b[k] for k in ("seed", "frames", "seconds", "output", "status")} == \
                   {k: a[k] for k in ("seed", "frames", "seconds", "output", "status")}
            got = audio(tmp_path / d / b["output"])
            np.testing.assert_allclose(got, ref, atol=3 / 32768, rtol=0)
    for k, (_, msg) in enumerate(BAD):  # each bad row: its line, its id, the reason
        rec = [x for x in map(json.loads, open(tmp_path / "mixed" / "results.jsonl"))
               if x["line"] == 2 * k + 2][0]
        assert rec["status"] == "error" and msg in rec["error"], rec
        assert rec["error"].startswith(f"row {2 * k + 2}")
        assert rec["model"]["lm"].startswith("lm.safetensors@") and rec["commit"]
    # no stray temporaries; one file per good row
    assert sorted(p.name for p in (tmp_path / "mixed").iterdir()) == sorted(
        [f"{r['id']}.{r.get('format', 'wav')}" for r in rows] + ["results.jsonl"])


def test_resume_after_a_kill_redoes_only_unfinished_rows(files, tmp_path, monkeypatch):
    rows = good_rows()[:6]
    m = write_manifest(files / "m3.jsonl", rows)
    full = tmp_path / "full"
    run(files, m, full, max_streams=2)
    out = tmp_path / "killed"
    real = B.ResultsWriter.write
    calls = []

    def dies(self, rec):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the kill: rows in flight are lost
        calls.append(rec["id"])
        real(self, rec)

    monkeypatch.setattr(B.ResultsWriter, "write", dies)
    with pytest.raises(KeyboardInterrupt):
        run(files, m, out, max_streams=2)
    monkeypatch.setattr(B.ResultsWriter, "write", real)
    with open(out / "results.jsonl", "a") as f:
        f.write('{"id": "a5", "status": "o')  # a line torn by the kill
    (out / calls[0]).with_suffix(".wav").unlink()  # a finished row whose file went away
    s = run(files, m, out, max_streams=2)
    assert s["skipped"] == 2 and s["ok"] == len(rows) - 2 and s["failed"] == 0
    again = run(files, m, out, max_streams=2)
    assert again["skipped"] == len(rows) and again["ok"] == 0
    lines = open(out / "results.jsonl").read().splitlines()
    assert len(lines) == len(rows)  # compacted: one record per row
    ref, got = results(full), results(out)
    assert set(got) == {r["id"] for r in rows}
    for k in got:
        assert got[k]["seconds"] == ref[k]["seconds"] and got[k]["status"] == "ok"
        np.testing.assert_allclose(audio(out / got[k]["output"]),
                                   audio(full / ref[k]["output"]), atol=3 / 32768, rtol=0)


def test_window_bounds_rows_in_flight_and_reads_lazily(files):
    job = B.Job(B.JobConfig(checkpoint=str(files / "lm.safetensors"),
                            vae=str(files / "vae.safetensors"), max_streams=2, window=3,
                            eos_threshold=None, max_seconds=0.25, cache_mb=4),
                files / "lazy")
    read, peak = [0], [0]
    start = job.start

    def counted(row):
        start(row)
        peak[0] = max(peak[0], len(job.flights))

    job.start = counted

    def lines():  # as long as you like: nothing is read ahead of the window
        for i in range(10_000):
            read[0] += 1
            yield i + 1, json.dumps({"id": f"r{i}", "text": "hi"})

    for k, rec in enumerate(job.process(lines())):
        assert rec["status"] == "ok"
        assert read[0] <= k + 1 + 3  # finished rows + the window
        if k == 20:
            break
    assert peak[0] == 3


def test_music_captions_and_model_errors(files, tmp_path):
    rows = [{"id": "jazz", "caption": "genre:jazz, tempo:fast", "max_seconds": 0.5},
            {"id": "tags", "caption": ["instrument:piano"], "cfg": 2.0, "max_seconds": 0.5},
            {"id": "nope", "caption": ["genre:polka"]},
            {"id": "words", "text": "a music model has no text input"}]
    m = write_manifest(tmp_path / "music.jsonl", rows)
    s = B.run_batch(m, tmp_path / "out", checkpoint=files / "music.safetensors",
                    vae=files / "vae.safetensors", **OPTS)
    assert (s["ok"], s["failed"]) == (2, 2)
    r = results(tmp_path / "out")
    assert r["jazz"]["frames"] == 6 and r["tags"]["seconds"] == pytest.approx(6 * 0.08)
    assert "polka" in r["nope"]["error"] and "no text conditioning" in r["words"]["error"]


def test_command_exit_codes_summary_and_progress(files, tmp_path, capsys):
    m = write_manifest(files / "mcli.jsonl", good_rows()[:2] + [BAD[1][0]])
    lm, vae = str(files / "lm.safetensors"), str(files / "vae.safetensors")
    # (neither --checkpoint nor --vae: the shipped default model, see test_shipped_models)
    assert B.main(["batch", str(m), str(tmp_path / "o"), "--vae", vae]) == 1
    assert "--checkpoint is required with --vae" in capsys.readouterr().err
    assert B.main(["batch", str(m), str(tmp_path / "o"), "--checkpoint", lm]) == 1
    assert "--vae is required with --checkpoint" in capsys.readouterr().err
    assert B.main(["batch", str(tmp_path / "none.jsonl"), str(tmp_path / "o"),
                   "--checkpoint", lm, "--vae", vae]) == 1
    assert "no manifest at" in capsys.readouterr().err
    assert B.main(["batch", str(m), str(tmp_path / "o"), "--checkpoint", lm, "--vae",
                   str(tmp_path / "missing.safetensors")]) == 1
    assert "--vae: no file at" in capsys.readouterr().err
    assert B.main(["batch", str(m), str(tmp_path / "o"), "--checkpoint", lm, "--vae", vae,
                   "--eos-threshold", "soon"]) == 1
    with pytest.raises(SystemExit) as e:
        B.main(["batch", str(m), str(tmp_path / "o"), "--format", "aiff"])
    assert e.value.code == 2
    assert B.main(["batch", str(m), str(tmp_path / "o"), "--checkpoint", lm, "--vae", vae,
                   "--eos-threshold", "off", "--max-streams", "2", "--cache-mb", "4"]) == 0
    io = capsys.readouterr()
    assert "batch: 2 ok, 1 failed, 0 already done" in io.out
    assert "rtf=" in io.err and "row" in io.err  # the progress bar
    import argparse

    p = argparse.ArgumentParser()  # the CLI owner's parser: register() adds `batch`
    B.register(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["batch", "m.jsonl", "out", "--ray", "--workers", "2"])
    assert a.ray == "" and a.workers == 2 and a.fn is B._cmd
    assert p.parse_args(["batch", "m", "o", "--ray", "auto"]).ray == "auto"
    assert p.parse_args(["batch", "m", "o"]).ray is None


def test_voice_files_and_pocket_voice_states(files, tmp_path):
    """A row's voice may be a voice file: ours (latents) or a pocket-tts voice state of the
    job's model (attention K/V, a template that is never prefilled), the same audio as the
    prompt audio it was made from; a state of another model fails its row only."""
    from safetensors.torch import save_file

    from calm_fast.runtime.export import load_model
    from calm_fast.runtime.voices import encode_prompt, save_voice
    from tiny_models import pocket_voice_state

    lm = load_model(files / "lm.safetensors", expect="calm").eval()
    vae = load_model(files / "vae.safetensors", expect="vae").eval()
    lat = encode_prompt(vae, files / "voice.wav")
    save_voice(tmp_path / "lat.safetensors", lat, vae)
    state = pocket_voice_state(lm, lat)
    save_file(state, str(tmp_path / "kv.safetensors"))
    save_file({k: v for k, v in state.items() if ".layers.1." not in k},
              str(tmp_path / "other.safetensors"))
    rows = [{"id": name, "text": "the same words", "voice": str(voice), "seed": 5}
            for name, voice in (("wav", files / "voice.wav"),
                                ("lat", tmp_path / "lat.safetensors"),
                                ("kv", tmp_path / "kv.safetensors"),
                                ("other", tmp_path / "other.safetensors"))]
    s = run(files, write_manifest(tmp_path / "m.jsonl", rows), tmp_path / "out", max_streams=2)
    assert (s["ok"], s["failed"]) == (3, 1)
    got = results(tmp_path / "out")
    assert "layer 1" in got["other"]["error"]
    ref = audio(tmp_path / "out" / "wav.wav")
    for name in ("lat", "kv"):  # (the rows run beside different neighbours: 3 LSB, as above)
        np.testing.assert_allclose(audio(tmp_path / "out" / f"{name}.wav"), ref,
                                   atol=3 / 32768, rtol=0)


def test_bf16_weights_run_the_same_rows(files, tmp_path):
    """--precision bf16: every row made, the same lengths as fp32 (no EOS here), audio close
    to fp32's on this tiny model; a precision that does not exist is refused before any row."""
    m = write_manifest(files / "m_bf16.jsonl", good_rows()[:4])
    fp = run(files, m, tmp_path / "fp32")
    bf = run(files, m, tmp_path / "bf16", precision="bf16")
    assert fp["ok"] == bf["ok"] == 4 and bf["failed"] == 0
    for r in good_rows()[:4]:
        a, b = (audio(tmp_path / mode / f"{r['id']}.wav") for mode in ("fp32", "bf16"))
        assert a.shape == b.shape and np.isfinite(b).all()
        assert np.corrcoef(a[:, 0], b[:, 0])[0, 1] > 0.5
    with pytest.raises(ValueError, match="precision must be one of"):
        run(files, m, tmp_path / "bad", precision="fp8")
    assert not (tmp_path / "bad").exists()
