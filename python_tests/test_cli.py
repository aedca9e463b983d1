"""The calm-fast command line: help, info, data builders, clear errors."""
import json
import shutil
import subprocess

import pytest

from calm_fast.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["native extension"].startswith("yes")


def test_console_script_is_installed():
    exe = shutil.which("calm-fast")
    assert exe, "the calm-fast entry point is not on PATH"
    res = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "data" in res.stdout


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="TTS engines not installed")
def test_data_speech(tmp_path, capsys):
    assert main(["data", "speech", str(tmp_path), "--n", "2", "--workers", "1"]) == 0
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 2
    # the flags of the shipped build (configs/speech_tts.toml), small: about 20 s of train
    # audio, 1 evaluation sentence per held-out voice, no WER gate
    out = tmp_path / "h"
    assert main(["data", "speech", str(out), "--hours", str(20 / 3600), "--pseudo", "0",
                 "--held-out", "0.5", "--eval", "1", "--wer-threshold", "off", "--workers", "1",
                 "-q"]) == 0
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert {"train", "test_voice"} <= {r["split"] for r in rows}
    with pytest.raises(SystemExit) as e:
        main(["data", "speech", str(out), "--wer-threshold", "high"])
    assert e.value.code == 2


def test_bad_arguments_exit_cleanly(capsys):
    assert main(["data", "speech", "/tmp/calm-unused", "--n", "0"]) == 1
    assert "n_utterances must be in [1, inf], got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["nope"])


# -- the doors: tts / continue / music / export-voice / voices / serve, through subprocess --
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402


def _cli(*args, stdin=None, timeout=120):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "calm_fast.cli", *map(str, args)],
                          input=stdin, capture_output=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny_models import export_tiny

    d = tmp_path_factory.mktemp("cli_models")
    export_tiny(d)
    t = np.arange(1600) / 1600
    sf.write(str(d / "prompt.wav"), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 1600)
    return d


def _ck(d, lm="lm.safetensors"):
    return ["--checkpoint", d / lm, "--vae", d / "vae.safetensors"]


class _Res:  # what an in-process main() run gives, shaped like subprocess's result
    def __init__(self, rc, err):
        self.returncode, self.stderr = rc, err.encode()


def _main(capsys, *args):
    from calm_fast.cli import main as cli_main

    capsys.readouterr()
    try:
        rc = cli_main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    return _Res(rc, capsys.readouterr().err)


def _one_line_error(res, *words):
    err = res.stderr.decode()
    assert res.returncode == 1, err
    assert "Traceback" not in err and err.startswith("calm-fast: error: "), err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_errors_are_one_line_exit_1_and_usage_exit_2(models, tmp_path, capsys):
    # through the console entry point: exit codes and stderr as a shell sees them
    _one_line_error(_cli("tts", "hi", "-o", tmp_path / "x.wav", "--checkpoint",
                         tmp_path / "no_such.safetensors"), "no_such.safetensors")
    res = _cli("tts", "hi", "-o", "x.wav", "--seed", "one")
    assert res.returncode == 2 and b"usage:" in res.stderr and b"--seed" in res.stderr
    # the rest in process (the same main())
    run = lambda *a: _main(capsys, *a)  # noqa: E731
    _one_line_error(run("tts", "hi", "-o", tmp_path / "x.wav", "--checkpoint",
                        models / "lm.safetensors", "--vae", tmp_path / "none.safetensors"),
                    "--vae")
    _one_line_error(run("tts", "hi", "-o", tmp_path / "x.wav", "--checkpoint",
                        "no_such_pocket_config"), "--checkpoint")
    _one_line_error(run("tts", "hi", "-o", tmp_path / "x.wav", *_ck(models), "--voice",
                        tmp_path / "missing.wav"), "missing.wav")
    _one_line_error(run("tts", "hi", "-o", tmp_path / "x.ogx", *_ck(models)), "format")
    _one_line_error(run("tts", "hi [pause:99s]", "-o", tmp_path / "x.wav", *_ck(models)),
                    "pause")
    _one_line_error(run("tts", "hi", "-o", tmp_path / "x.wav", "--checkpoint",
                        models / "vae.safetensors"), "--vae")
    _one_line_error(run("continue", tmp_path / "nope.wav", "-o", tmp_path / "x.wav",
                        *_ck(models)), "nope.wav")
    _one_line_error(run("serve", "--port", 1, "--checkpoint", tmp_path / "no_such.safetensors"),
                    "no_such.safetensors")  # refused before anything binds
    _one_line_error(run("serve", "--port", 1, "--int8", "--precision", "bf16", *_ck(models)),
                    "disagree")
    import torch
    from safetensors.torch import save_file

    save_file({"transformer.layers.0.self_attn/cache": torch.zeros(2, 1, 4, 2, 2),
               "transformer.layers.0.self_attn/offset": torch.zeros(1)},
              str(tmp_path / "pocket_voice.safetensors"))  # the package's exported state
    _one_line_error(run("tts", "hi", "-o", tmp_path / "x.wav", *_ck(models), "--voice",
                        tmp_path / "pocket_voice.safetensors"), "does not fit this model")
    assert not (tmp_path / "x.wav").exists()  # a failed run leaves no partial file
    for bad in (["tts"], ["tts", "hi"], ["serve", "--port", "http"], ["nope"],
                ["serve", "--precision", "fp8"],
                ["tts", "hi", "-o", "x.wav", "--format", "ogg"]):
        res = run(*bad)
        assert res.returncode == 2 and "usage:" in res.stderr.decode(), bad


def test_help_explains_every_flag_with_its_default(capsys):
    import re

    res = _cli("tts", "--help")
    assert res.returncode == 0 and b"--voice" in res.stdout
    for cmd in ("tts", "continue", "music", "export-voice", "voices", "serve", "eval"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        options = text.split("\noptions:", 1)[1]
        entries = re.split(r"\n  (?=-)", options)[1:]
        assert len(entries) >= 2
        for entry in entries:
            if entry.startswith("-h, --help"):
                continue
            assert "default" in " ".join(entry.split()), (cmd, entry)


def test_serve_answers_then_stops(models):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen([sys.executable, "-m", "calm_fast.cli", "serve", "--port", str(port),
                          "--log-level", "warning", "--precision", "bf16", "--no-overlap",
                          *map(str, _ck(models))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert json.loads(r.read())["status"] == "ok"
                    break
            except OSError:
                assert p.poll() is None and time.monotonic() - t0 < 60, p.stderr.read()
                time.sleep(0.2)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/audio/speech",
                                     json.dumps({"input": "Hi.", "response_format": "wav"})
                                     .encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and r.read()[:4] == b"RIFF"
    finally:
        p.terminate()
        p.wait(15)



def test_pocket_model_file_and_hf_cache_name(tmp_path):
    """A Pocket TTS model file (flow_lm.* + mimi.* keys, tokenizer.model beside it) loads
    with --checkpoint FILE, and a pocket-tts config name resolves through a local Hugging
    Face cache (HF_HUB_CACHE; nothing is downloaded). Tiny flow LM, pocket-shaped Mimi."""
    pytest.importorskip("pocket_tts")
    import torch
    import yaml
    from golden import perturbed
    from pocket_tts.utils.config import CONFIGS_DIR
    from safetensors.torch import save_file

    from calm_fast.codec.vae import VAE, vae_preset
    from calm_fast.model.calm import CALM
    from calm_fast.model.conditioning import SentencePieceTokenizer
    from calm_fast.model.config import preset

    words = "the a one two three speak voice model small fast slow hello there world".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) + "."
             for i in range(200)]
    tok = SentencePieceTokenizer.train(texts, 48)
    torch.manual_seed(0)
    lm = perturbed(CALM(preset("tiny").with_(latent_dim=32), tok))
    vae = VAE(vae_preset("pocket"))
    sd = {f"flow_lm.{k}": v for k, v in lm.state_dict().items()}
    sd.update({f"mimi.{k}": v for k, v in vae.state_dict().items()})
    d = tmp_path / "pocket"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    tok.save(d / "tokenizer.model")
    args = ["hello there world.", "--max-seconds", "0.24", "--eos-threshold", "off", "-q"]
    res = _cli("tts", *args, "-o", tmp_path / "a.wav", "--checkpoint", d / "model.safetensors")
    assert res.returncode == 0, res.stderr.decode()
    wav, sr = sf.read(str(tmp_path / "a.wav"))
    assert sr == 24000 and len(wav) == 3 * 1920
    # a voice state as the package exports it (its attention cache after the voice prompt)
    # speaks like the prompt it was made from: here the cache is the one calm_fast's own
    # prefill of that prompt writes, so the audio must be the same, bit for bit
    from calm_fast.runtime.voices import encode_prompt, save_voice
    from calm_fast.serve.models import load_synth
    from tiny_models import pocket_voice_state

    synth = load_synth(d / "model.safetensors")
    t = np.arange(24000) / 24000
    sf.write(str(tmp_path / "me.wav"), (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32),
             24000)
    lat = encode_prompt(synth.vae, tmp_path / "me.wav")
    save_voice(tmp_path / "lat.safetensors", lat, synth.vae)
    state = pocket_voice_state(synth.lm, lat)
    save_file(state, str(tmp_path / "kv.safetensors"))
    for voice, out in (("lat.safetensors", "v1.wav"), ("kv.safetensors", "v2.wav")):
        res = _cli("tts", *args, "-o", tmp_path / out, "--checkpoint", d / "model.safetensors",
                   "--voice", tmp_path / voice)
        assert res.returncode == 0, res.stderr.decode()
    assert np.array_equal(sf.read(str(tmp_path / "v1.wav"))[0], sf.read(str(tmp_path / "v2.wav"))[0])
    # the same files laid out as the hub cache of a packaged config
    name = "english"
    cfg = yaml.safe_load((Path(CONFIGS_DIR) / f"{name}.yaml").read_text())
    hub = tmp_path / "hub"
    for url, src in ((cfg["weights_path"], d / "model.safetensors"),
                     (cfg["flow_lm"]["lookup_table"]["tokenizer_path"], None)):
        body, _, rev = url[len("hf://"):].partition("@")
        owner, repo, *rest = body.split("/")
        dst = hub / f"models--{owner}--{repo}" / "snapshots" / rev / "/".join(rest)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src is None:  # this config names a tokenizers JSON: make one from the vocabulary
            from tokenizers import Tokenizer, models, pre_tokenizers

            vocab = {w: i for i, w in enumerate(["[UNK]"] + words + ["."])}
            t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
            t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
            t.save(str(dst))
        else:
            dst.symlink_to(src)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        res = _cli("tts", *args, "-o", tmp_path / "b.wav", "--checkpoint", name)
        assert res.returncode == 0, res.stderr.decode()
        assert len(sf.read(str(tmp_path / "b.wav"))[0]) == 3 * 1920
        _one_line_error(_cli("tts", *args, "-o", tmp_path / "c.wav", "--checkpoint", "french"),
                        "not in the local Hugging Face cache")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
