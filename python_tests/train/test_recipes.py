"""Training recipes (calm_fast/recipes) through ``calm-fast train``: the whole offline
pipeline on tiny shapes (audio -> VAE -> latent cache -> LM -> distilled student), exact
resume of the LM recipe, latent distillation of a real CALM, and clear errors."""
import json
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch

from calm_fast.errors import CheckpointError
from calm_fast.cli import main
from calm_fast.runtime.export import export_model, load_model
from calm_fast.model.calm import CALM
from calm_fast.model.config import preset
from calm_fast.train.recipes import RecipeError, run_recipe
from calm_fast.train.recipes.distill import make_student, teacher_targets
from calm_fast.train.recipes.lm import LMData, LMObjective, Utterances
from calm_fast.train.objectives import latent_distillation_loss

SR = 1600  # the tiny VAE preset's rate: 128 samples per 12.5 Hz frame


def write_toml(path, text):
    path.write_text(text)
    return str(path)


def fake_speech(root, n=12):
    """n short clips from 2 'speakers' (two pitches), with texts, as a builder manifest."""
    rows = []
    for i in range(n):
        spk = i % 2
        f0 = 110.0 if spk == 0 else 190.0
        dur = 0.8 + 0.1 * (i % 4)
        t = np.arange(int(dur * SR)) / SR
        wav = 0.4 * np.sin(2 * np.pi * f0 * (1 + 0.1 * np.sin(3 * t)) * t)
        rel = f"train/s{spk}/{i:03d}.flac"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, wav.astype(np.float32), SR, subtype="PCM_16")
        rows.append({"path": rel, "text": f"utterance number {i}", "split": "train",
                     "speaker_id": f"s{spk}", "sample_rate": SR, "duration": dur})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "manifest.jsonl"


def write_cache(root, frames, index):
    """A latent cache in the documented layout from per-file frames and index rows (each
    row's offset and frame count are filled in from its frames)."""
    root.mkdir(parents=True, exist_ok=True)
    off = 0
    for x, r in zip(frames, index):
        r.update(offset=off, frames=len(x))
        off += len(x)
    np.concatenate(frames).tofile(root / "latents.f32")
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))
    total = sum(len(x) for x in frames)
    (root / "meta.json").write_text(json.dumps({"latent_dim": frames[0].shape[1],
                                                "frame_rate": 12.5, "total_frames": total,
                                                "files": len(frames)}))
    return root


def synthetic_cache(root, n=24, dim=8, seed=0):
    """A latent cache in the documented layout: per utterance a smooth random walk whose
    drift depends on the speaker, with text."""
    g = np.random.default_rng(seed)
    frames, index = [], []
    for i in range(n):
        L = int(g.integers(8, 20))
        drift = 0.3 if i % 2 else -0.3
        x = np.cumsum(drift + 0.2 * g.standard_normal((L, dim)), 0).astype(np.float32)
        frames.append(x)
        index.append({"path": f"{i}.flac", "text": f"say {i}", "split": "train",
                      "speaker_id": f"s{i % 2}"})
    return write_cache(root, frames, index)


LM_RECIPE = """
kind = "lm"
out_dir = "{out}"
[data]
latents = "{lat}"
batch = 4
max_frames = 40
voice_frames = 4
[model]
preset = "tiny"
[objective]
head_mult = 2
[train]
steps = {steps}
lr = 1e-3
log_every = 1
ckpt_every = {ckpt}
progress = false
"""


DISTILL_RECIPE = """
kind = "distill"
out_dir = "{out}"
[student]
teacher = "{teacher}"
layers = [{layer}]
cfg_scale = 1.5
[data]
latents = "{lat}"
batch = {batch}
voice_frames = 4
[train]
steps = {steps}
lr = 3e-3
warmup = 10
ema_decay = 0.9
log_every = 50
ckpt_every = 1000
progress = false
"""


def test_cli_pipeline_audio_to_distilled_student(tmp_path, capsys):
    manifest = fake_speech(tmp_path / "data")
    vae_recipe = write_toml(tmp_path / "vae.toml", f"""
kind = "vae"
out_dir = "{tmp_path / 'vae'}"
[data]
manifest = "{manifest}"
segment_seconds = 0.64
batch = 2
[model]
preset = "tiny"
[loss]
adv = 1.0
feat = 1.0
[train]
steps = 2
log_every = 1
progress = false
""")
    assert main(["train", "vae", vae_recipe]) == 0
    vae = load_model(tmp_path / "vae" / "vae.safetensors", expect="vae")
    assert vae.cfg.name == "tiny"
    log = [json.loads(x) for x in (tmp_path / "vae" / "metrics.jsonl").read_text().splitlines()]
    assert {"mel", "stft", "kl", "adv", "feat", "d"} <= set(log[-1])  # the GAN terms ran

    lat = tmp_path / "latents"
    assert main(["data", "latents", str(manifest), str(tmp_path / "vae" / "vae.safetensors"),
                 str(lat)]) == 0
    meta = json.loads((lat / "meta.json").read_text())
    assert meta["latent_dim"] == 8 and meta["files"] == 12

    lm_recipe = write_toml(tmp_path / "lm.toml",
                           LM_RECIPE.format(out=tmp_path / "lm", lat=lat, steps=3, ckpt=3))
    assert main(["train", "lm", lm_recipe]) == 0
    teacher = load_model(tmp_path / "lm" / "model.safetensors", expect="calm")
    assert teacher.cfg.backbone.num_layers == 2
    assert teacher.conditioner.tokenizer.encode("a") == [97]  # bytes tokenizer travels
    assert not torch.allclose(teacher.emb_std, torch.ones(8))  # measured on the latents

    dis = write_toml(tmp_path / "distill.toml", DISTILL_RECIPE.format(
        out=tmp_path / "student", teacher=tmp_path / "lm" / "model.safetensors", layer=1,
        lat=lat, batch=4, steps=2))
    assert main(["train", "distill", dis]) == 0
    student = load_model(tmp_path / "student" / "model.safetensors", expect="calm")
    assert student.cfg.backbone.num_layers == 1
    for k, v in teacher.state_dict().items():  # frozen head and EOS head: the teacher's own
        if k.startswith(("flow_net.", "out_eos.")):
            torch.testing.assert_close(student.state_dict()[k], v, rtol=0, atol=0)

    # the student generates through the fast path
    from calm_fast.runtime.generate import CALMGenerator, Request
    with torch.no_grad():
        out = CALMGenerator(student).generate(
            [Request(student.prefix(text="say 3"), max_frames=5, seed=0, eos_threshold=None)])
    assert out[0].shape == (5, 8) and torch.isfinite(out[0]).all()


def test_lm_recipe_resume_is_exact(tmp_path):
    lat = synthetic_cache(tmp_path / "lat")
    full = write_toml(tmp_path / "a.toml",
                      LM_RECIPE.format(out=tmp_path / "a", lat=lat, steps=6, ckpt=3))
    run_recipe(full)
    part = write_toml(tmp_path / "b.toml",
                      LM_RECIPE.format(out=tmp_path / "b", lat=lat, steps=6, ckpt=3))
    run_recipe(part, sets=["train.stop_after=3"])  # "killed" after the checkpoint of step 3
    run_recipe(part)  # resumes from runs/b/last.safetensors
    a = load_model(tmp_path / "a" / "model.safetensors").state_dict()
    b = load_model(tmp_path / "b" / "model.safetensors").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["head"]) and np.isfinite(r["eos"]) for r in rows)


def test_lm_recipe_guided_attention_is_logged_and_trains_the_chosen_head(tmp_path):
    lat = synthetic_cache(tmp_path / "lat")
    text = LM_RECIPE.format(out=tmp_path / "a", lat=lat, steps=3, ckpt=3)
    run_recipe(write_toml(tmp_path / "a.toml", text),
               sets=["objective.align_weight=1", "objective.align_layer=1"])
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["align"] <= 1 for r in rows)
    # without the penalty the same run is the plain one: no "align" column
    run_recipe(write_toml(tmp_path / "b.toml",
                          LM_RECIPE.format(out=tmp_path / "b", lat=lat, steps=1, ckpt=1)))
    row = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert "align" not in row


def test_lm_recipe_warm_starts_from_an_export(tmp_path):
    lat = synthetic_cache(tmp_path / "lat")
    run_recipe(write_toml(tmp_path / "a.toml",
                          LM_RECIPE.format(out=tmp_path / "a", lat=lat, steps=3, ckpt=3)))
    init = tmp_path / "a" / "model.safetensors"
    # lr 0: the warm-started run's export is its starting point, tensor for tensor
    run_recipe(write_toml(tmp_path / "b.toml",
                          LM_RECIPE.format(out=tmp_path / "b", lat=lat, steps=1, ckpt=1)),
               sets=[f'model.init="{init}"', "train.lr=0.0", "train.weight_decay=0.0"])
    a = load_model(init).state_dict()
    b = load_model(tmp_path / "b" / "model.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    with pytest.raises(RecipeError, match="architecture differs.*backbone"):
        run_recipe(write_toml(tmp_path / "c.toml",
                              LM_RECIPE.format(out=tmp_path / "c", lat=lat, steps=1, ckpt=1)),
                   sets=[f'model.init="{init}"', "model.backbone.num_layers=1"])


def test_guided_attention_gradient_reaches_only_its_layer_and_those_below(tmp_path):
    from calm_fast.model.conditioning import ByteTokenizer
    from calm_fast.train.recipes.lm import LMData, LMObjective, LMTraining, Utterances

    lat = synthetic_cache(tmp_path / "lat")
    utts = Utterances(LMData(latents=str(lat), batch=4, max_frames=40, voice_frames=4), 8)
    torch.manual_seed(0)
    calm = CALM(replace(preset("tiny"), text_bins=256), ByteTokenizer())
    batch = {**utts.batch(4, calm.conditioner.tokenizer, LMObjective(p_text=0, p_voice=0),
                          torch.Generator().manual_seed(0)), "step": 1}

    def grads(weight):
        module = LMTraining(calm, LMObjective(align_weight=weight, align_layer=0))
        calm.zero_grad()
        torch.manual_seed(1)  # the same VP noise and head draws both times
        loss, logs = module(batch)
        loss.backward()
        return {n: p.grad.clone() for n, p in calm.named_parameters() if p.grad is not None}, logs

    plain, _ = grads(0.0)
    guided, logs = grads(1.0)
    assert 0 < float(logs["align"]) <= 1
    assert not torch.allclose(plain["transformer.layers.0.self_attn.in_proj.weight"],
                              guided["transformer.layers.0.self_attn.in_proj.weight"])
    for name in plain:
        if name.startswith("transformer.layers.1.") or name.startswith("flow_net."):
            torch.testing.assert_close(plain[name], guided[name], msg=name)


def test_distillation_one_layer_student_matches_teacher_cfg_z(tmp_path):
    """A real CALM teacher (tiny, 2 layers, random weights, text + voice conditioned); its
    1-layer student, seeded from teacher layer 0, learns the CFG-combined Z (alpha 1.5)."""
    lat = synthetic_cache(tmp_path / "lat", n=32)
    torch.manual_seed(0)
    from calm_fast.model.conditioning import ByteTokenizer
    cfg = preset("tiny").with_(text_bins=256)
    teacher = CALM(cfg, ByteTokenizer()).eval()
    export_model(tmp_path / "teacher.safetensors", teacher)
    data = LMData(latents=str(lat), batch=8, voice_frames=4)
    utts = Utterances(data, 8)
    ev = utts.batch(32, ByteTokenizer(), LMObjective(p_text=0, p_voice=0),
                    torch.Generator().manual_seed(123))
    student0 = make_student(teacher, [0])

    def err(student):
        z_c, z_n = teacher_targets(teacher, ev)
        from calm_fast.train.recipes.lm import frame_mask, prefix_batch
        with torch.no_grad():
            p, m = prefix_batch(student, ev["tokens"], ev["voices"])
            z, _ = student(student.normalize(ev["latents"]), p, m)
        mask = frame_mask(ev["lengths"], z.shape[1], include_end=True)
        return latent_distillation_loss(z, z_c, z_n, 1.5, mask).item(), z_c

    before, z_c = err(student0)
    recipe = write_toml(tmp_path / "d.toml", DISTILL_RECIPE.format(
        out=tmp_path / "d", teacher=tmp_path / "teacher.safetensors", layer=0, lat=lat,
        batch=8, steps=150))
    run_recipe(recipe, kind="distill")
    after, _ = err(load_model(tmp_path / "d" / "model.safetensors"))
    assert after < 0.2 * before, (before, after)


def test_recipe_errors(tmp_path, capsys):
    lat = synthetic_cache(tmp_path / "lat")
    ok = LM_RECIPE.format(out=tmp_path / "o", lat=lat, steps=1, ckpt=1)
    with pytest.raises(RecipeError, match="unknown keys \\['stepz'\\]"):
        run_recipe(write_toml(tmp_path / "a.toml", ok.replace("steps =", "stepz =")))
    with pytest.raises(RecipeError, match="kind must be one of"):
        run_recipe(write_toml(tmp_path / "b.toml", ok.replace('"lm"', '"gan"')))
    with pytest.raises(RecipeError, match="not 'vae'"):
        run_recipe(write_toml(tmp_path / "c.toml", ok), kind="vae")
    with pytest.raises(RecipeError, match="not valid TOML"):
        run_recipe(write_toml(tmp_path / "d.toml", "kind = "))
    with pytest.raises(RecipeError, match="head_mult"):
        run_recipe(write_toml(tmp_path / "e.toml", ok), sets=["objective.head_mult=0"])
    with pytest.raises(RecipeError, match="does not fit"):
        run_recipe(write_toml(tmp_path / "f.toml", ok), sets=['objective.kind="consistency"'])
    with pytest.raises(RecipeError, match="align_layer must be in"):
        run_recipe(write_toml(tmp_path / "e2.toml", ok),
                   sets=["objective.align_weight=1", "objective.align_layer=9"])
    with pytest.raises(RecipeError, match="align_weight must be >= 0"):
        run_recipe(write_toml(tmp_path / "e3.toml", ok), sets=["objective.align_weight=-1"])
    with pytest.raises(RecipeError, match="8-dim latents, the model takes 32"):
        run_recipe(write_toml(tmp_path / "g.toml", ok), sets=["model.latent_dim=32"])
    with pytest.raises(RecipeError, match="d_model"):  # nested override, checked by the config
        run_recipe(write_toml(tmp_path / "h.toml", ok), sets=["model.backbone.d_model=66"])
    with pytest.raises(RecipeError, match=r"an lm recipe takes .*; got \[student\]"):
        run_recipe(write_toml(tmp_path / "i.toml", ok), sets=['student.teacher="x"'])
    with pytest.raises(RecipeError, match="student.layers"):
        teacher = CALM(preset("tiny"))
        make_student(teacher, [5])
    with pytest.raises(CheckpointError, match="not a calm_fast model export"):
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
        load_model(tmp_path / "x.safetensors")
    # the command line: one clear line, exit code 1
    assert main(["train", "lm", str(tmp_path / "missing.toml")]) == 1
    assert "cannot read recipe" in capsys.readouterr().err


@pytest.mark.slow
def test_lm_recipe_under_torchrun_two_cpu_processes(tmp_path):
    """`calm-fast train lm` as 2 gloo ranks (each draws its own batch of 4; a dropped voice
    leaves parameters without gradient, which DDP must accept); rank 0 alone logs, writes
    the checkpoint and the export."""
    from train_toy import torchrun

    lat = synthetic_cache(tmp_path / "lat")
    recipe = write_toml(tmp_path / "lm.toml",
                        LM_RECIPE.format(out=tmp_path / "lm", lat=lat, steps=3, ckpt=3))
    res = torchrun(["-m", "calm_fast.cli", "train", "lm", recipe])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    model = load_model(tmp_path / "lm" / "model.safetensors", expect="calm")
    rows = [json.loads(x) for x in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one writer
    assert model.cfg.backbone.num_layers == 2


def test_only_rank_zero_writes_the_recipe_record(tmp_path, monkeypatch):
    """Every torchrun rank checks the folder; two writers once raced on one temporary name
    (CI: 'No such file ... recipe.json.tmp -> recipe.json')."""
    from calm_fast.train.recipes import claim_out_dir

    rec = {"kind": "lm", "out_dir": str(tmp_path / "run"), "train": {"steps": 3}}
    monkeypatch.setenv("RANK", "1")
    claim_out_dir(rec)
    assert (tmp_path / "run").is_dir() and not (tmp_path / "run" / "recipe.json").exists()
    monkeypatch.setenv("RANK", "0")
    claim_out_dir(rec)
    assert json.loads((tmp_path / "run" / "recipe.json").read_text()) == rec
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["recipe.json"]  # no temporaries


def test_reruns_refuse_other_settings_and_keep_metrics_single(tmp_path):
    lat = synthetic_cache(tmp_path / "lat")
    rec = write_toml(tmp_path / "r.toml",
                     LM_RECIPE.format(out=tmp_path / "r", lat=lat, steps=5, ckpt=2))
    with pytest.raises(RecipeError, match="unknown section 'trian'"):
        run_recipe(rec, sets=["trian.steps=500"])
    run_recipe(rec, sets=["train.stop_after=2"])  # checkpoint of step 2, then "killed"...
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:  # ...after logging step 3
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + '{"step": 4, "lo')
    with pytest.raises(RecipeError, match=r"other settings \(train.lr: 0.001 -> 0.5\)"):
        run_recipe(rec, sets=["train.lr=0.5"])
    run_recipe(rec)  # where it stops may change: resumes at step 2
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[2]["loss"] != 9.0
    with pytest.raises(RecipeError, match="other settings"):  # a finished run as well
        run_recipe(rec, sets=["train.steps=8"])
    run_recipe(rec, sets=["train.steps=8"], force=True)  # asked for: it goes on
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))


def with_durations(lat, seed=0):
    """durations.jsonl for a synthetic cache read with the bytes tokenizer: random
    sub-frame counts over [0] + bytes + [0] that fill each utterance's frames."""
    g = np.random.default_rng(seed)
    rows = [json.loads(x) for x in (lat / "index.jsonl").read_text().splitlines()]
    out = []
    for i, r in enumerate(rows):
        n = len(r["text"].encode()) + 2
        cuts = np.sort(g.choice(np.arange(1, 8 * r["frames"]), n - 1, replace=False))
        out.append({"row": i, "path": r["path"],
                    "durations": np.diff(np.r_[0, cuts, 8 * r["frames"]]).tolist()})
    (lat / "durations.jsonl").write_text("".join(json.dumps(o) + "\n" for o in out))
    return lat


def test_lm_recipe_aligned_text_trains_durations_and_exports(tmp_path):
    lat = synthetic_cache(tmp_path / "lat")
    text = LM_RECIPE.format(out=tmp_path / "a", lat=lat, steps=4, ckpt=4)
    with pytest.raises(RecipeError, match="no durations.jsonl.*calm-fast data align"):
        run_recipe(write_toml(tmp_path / "a.toml", text), sets=["model.aligned_text=true"])
    with_durations(lat)
    run_recipe(write_toml(tmp_path / "b.toml", text.replace(str(tmp_path / "a"), str(tmp_path / "b"))),
               sets=["model.aligned_text=true", "train.lr=3e-3"])
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["dur"]) and r["dur"] > 0 for r in rows)
    assert rows[-1]["dur"] < rows[0]["dur"]  # the duration predictor learns
    m = load_model(tmp_path / "b" / "model.safetensors")
    assert m.cfg.aligned_text and any(k.startswith("aligned.") for k in m.state_dict())
    prefix, frames = m.text_inputs("say 3", voice=torch.randn(4, 8))
    assert prefix.shape[0] == 5 and frames.shape[1] == 64


def music_cache(root, n=16, dim=8, seed=0):
    """A latent cache of 'renders' longer than a training window, with the music builder's
    index fields; channel 0 sits at +1 for pieces in G and -1 for pieces in C."""
    g = np.random.default_rng(seed)
    frames, index = [], []
    for i in range(n):
        L = int(g.integers(30, 60))
        key = "G major" if i % 2 else "C minor"
        x = 0.3 * g.standard_normal((L, dim)).astype(np.float32)
        x[:, 0] += 1.0 if i % 2 else -1.0
        frames.append(x)
        index.append({"path": f"{i}.flac", "split": "train", "key": key, "bpm": 70 + 5 * i,
                      "collection": "bach", "instruments": ["violin", "cello"],
                      "caption": f"Bach chorale, in {key}"})
    return write_cache(root, frames, index)


MUSIC_RECIPE = """
kind = "lm"
out_dir = "{out}"
[data]
latents = "{lat}"
batch = 8
max_frames = 12
crop = true
tags = true
[model]
preset = "tiny_music"
music_tags = []
[objective]
head_mult = 2
p_text = 0.1
p_tag = 0.2
eos_weight = 0.0
[train]
steps = {steps}
lr = 3e-3
warmup = 5
ema_decay = 0.9
log_every = 10
ckpt_every = 1000
progress = false
"""


def test_music_recipe_learns_what_its_tags_say(tmp_path):
    """Windows of max_frames cut from longer files, the tags of each index row (with
    dropout) in the prefix, the builder's vocabulary in the export; and the trained model
    follows the key tag: generated frames sit where that key's training frames were."""
    from calm_fast.model import music_tags
    from calm_fast.runtime.generate import CALMGenerator, Request

    lat = music_cache(tmp_path / "lat")
    data = LMData(latents=str(lat), batch=64, max_frames=12, crop=True, tags=True)
    utts = Utterances(data, 8)
    assert len(utts.items) == 16  # every file, though all are longer than a window
    b = utts.batch(64, None, LMObjective(p_text=0.25, p_tag=0.5), torch.Generator().manual_seed(0))
    assert b["latents"].shape[1] == 13 and (b["lengths"] == 12).all()  # + the EOS slot
    n_tags = [0 if t is None else len(t) for t in b["tags"]]
    full = len(music_tags.row_tags(utts.cache.index[0]))
    assert 0 in n_tags and full in n_tags and any(0 < k < full for k in n_tags)
    assert all(set(t) <= set(music_tags.VOCAB) for t in b["tags"] if t)

    text = MUSIC_RECIPE.format(out=tmp_path / "m", lat=lat, steps=200)
    with pytest.raises(RecipeError, match="eos_weight = 0"):
        run_recipe(write_toml(tmp_path / "bad.toml", text.replace("eos_weight = 0.0",
                                                                  "eos_weight = 1.0")))
    run_recipe(write_toml(tmp_path / "m.toml", text))
    m = load_model(tmp_path / "m" / "model.safetensors").float().eval()
    assert m.cfg.music_tags == music_tags.VOCAB
    gen = CALMGenerator(m)
    means = {}
    for key in ("G major", "C minor"):
        tags = music_tags.caption_tags(f"a chorale in {key}")
        reqs = [Request(m.prefix(tags=tags), max_frames=24, seed=s, eos_threshold=None)
                for s in range(4)]
        with torch.no_grad():
            out = gen.generate(reqs)
        means[key] = float(torch.cat([m.denormalize(x) for x in out])[:, 0].mean())
    assert means["G major"] > 0.4 and means["C minor"] < -0.4, means
