"""calm_fast.serve.distributed: the batch job as a Ray Data pipeline on a local Ray instance
(2 CPUs, started here, shut down after): the same files and results as the local job, and
a worker killed mid-batch has its rows redone, with no row written or recorded twice.
Skipped when Ray is not installed (pip install 'calm_fast[ray]')."""
import json
import os
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

ray = pytest.importorskip("ray")

from calm_fast.codec.vae import VAE, vae_preset  # noqa: E402
from calm_fast.model.conditioning import ByteTokenizer  # noqa: E402
from calm_fast.model.calm import CALM  # noqa: E402
from calm_fast.model.config import preset  # noqa: E402
from calm_fast.runtime.export import export_model  # noqa: E402
from calm_fast.serve import batch as B  # noqa: E402
from calm_fast.serve import distributed as D  # noqa: E402
from golden import perturbed  # noqa: E402

OPTS = dict(eos_threshold=None, cache_mb=4, max_streams=2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Ray's workers put the driver's working directory on their import path: started from
    # a source checkout, they would import its calm_fast/ (no built extension, no
    # kernels/) instead of the installed package. Start the cluster from an empty folder.
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("ray_cwd"))
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, _node_ip_address="127.0.0.1")
    finally:
        os.chdir(here)
    # the test's worker class travels by value (the workers cannot import this file)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("rayjob")
    torch.manual_seed(0)
    export_model(d / "lm.safetensors",
                 perturbed(CALM(preset("tiny").with_(text_bins=256), ByteTokenizer())))
    export_model(d / "vae.safetensors", VAE(vae_preset("tiny")))
    t = np.arange(1600) / 1600
    sf.write(d / "voice.wav", (0.3 * np.sin(2 * np.pi * 50 * t)).astype("float32"), 1600)
    rows = [{"id": f"r{i}", "text": f"line {i}", "max_seconds": 0.25 + 0.25 * (i % 3)}
            for i in range(10)]
    rows[2]["voice"] = rows[3]["voice"] = "voice.wav"
    rows[4]["cfg"] = 1.5
    rows[5]["seed"] = 11
    lines = [json.dumps(r) for r in rows]
    lines[6:6] = ['{"id": "bad", "text": "x", "speed": 2}', "not json",
                  '{"id": "r0", "text": "duplicate"}', '{"id": "gone", "text": "x", '
                  '"voice": "missing.wav"}']
    (d / "m.jsonl").write_text("\n".join(lines) + "\n")
    local = d / "local"
    s = B.run_batch(d / "m.jsonl", local, checkpoint=d / "lm.safetensors",
                    vae=d / "vae.safetensors", progress=False, **OPTS)
    assert (s["ok"], s["failed"]) == (10, 4)
    return d, local


def cfg_of(d):
    return B.JobConfig(checkpoint=str(d / "lm.safetensors"), vae=str(d / "vae.safetensors"),
                       base_dir=str(d), **OPTS)


def same_as_local(local, out):
    """Every record (timing-free) and every audio file as the local run's."""
    a, b = (open(p / "results.jsonl").read().splitlines() for p in (local, out))
    assert len(a) == len(b) == 14
    for x, y in zip(map(json.loads, a), map(json.loads, b)):
        assert x.pop("gain") == pytest.approx(y.pop("gain"), abs=1e-5) if "gain" in x else True
        assert x == y
    names = sorted(p.name for p in local.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names  # no temporaries, no leftovers
    for n in names:
        if n != "results.jsonl":
            u = sf.read(str(local / n), dtype="float32")[0]
            v = sf.read(str(out / n), dtype="float32")[0]
            np.testing.assert_allclose(v, u, atol=3 / 32768, rtol=0)


def test_ray_job_equals_local_job(cluster, job, capsys):
    d, local = job
    out = d / "ray2"
    s = B.run_batch(d / "m.jsonl", out, checkpoint=d / "lm.safetensors",
                    vae=d / "vae.safetensors", progress=False, ray_address="", workers=2,
                    cpus_per_worker=1, **OPTS)
    assert (s["ok"], s["failed"], s["skipped"]) == (10, 4, 0)
    same_as_local(local, out)
    # the command, resuming: nothing left to run but the bad rows (recorded again)
    assert B.main(["batch", str(d / "m.jsonl"), str(out), "--checkpoint",
                   str(d / "lm.safetensors"), "--vae", str(d / "vae.safetensors"), "--ray",
                   "--workers", "2", "--no-progress", "--eos-threshold", "off",
                   "--cache-mb", "4", "--max-streams", "2"]) == 0
    # (the duplicate of r0 is skipped with r0: a done id is skipped before the check)
    assert "batch: 0 ok, 3 failed, 10 already done" in capsys.readouterr().out
    same_as_local(local, out)


class DiesOnce(D.BatchWorker):
    """Kills its own process after two rows of its first batch (once per job: a marker
    file), as a node failure or an OOM kill would."""

    def __call__(self, batch):
        marker = self.job.cfg.base_dir + "/died"
        if os.path.exists(marker):
            return super().__call__(batch)
        recs = []
        for rec in self.job.process(self.rows(batch)):
            recs.append(rec)
            if len(recs) == 2:
                open(marker, "w").close()
                os._exit(1)


def test_killed_worker_rows_are_redone_once(cluster, job):
    d, local = job
    out = d / "killed"
    out.mkdir()
    s = D.run_ray(d / "m.jsonl", out, cfg_of(d), workers=1, progress=False, batch_rows=4,
                  worker_cls=DiesOnce)
    assert os.path.exists(d / "died")
    assert (s["ok"], s["failed"]) == (10, 4)  # each row recorded once, none lost
    same_as_local(local, out)
