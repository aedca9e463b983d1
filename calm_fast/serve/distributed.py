"""The batch job on a Ray cluster: the same rows, files and results as the local run.

    calm-fast batch rows.jsonl out/ --checkpoint lm.safetensors --vae vae.safetensors \\
        --ray [ADDRESS] --workers 4 --cpus-per-worker 2 [--gpus-per-worker 1]

A Ray Data pipeline:

1. the driver streams the manifest (calm_fast.serve.batch), checks each row, records the
   bad ones and the duplicates itself, skips the rows already done (resume), and writes the
   rest as chunk files under ``OUTDIR/.pending/``;
2. ``read_text`` reads those chunks (its tasks pinned to the driver's node, so OUTDIR need
   not be on a shared filesystem) and ``map_batches`` feeds them to a pool of actors
   (``BatchWorker``), each holding the model, loaded once, and a ``batch.Job`` with its
   Engine: a batch of rows streams through it with continuous batching, exactly as in
   the local run;
3. each worker returns one record per row with the encoded audio file's bytes; the driver
   writes every file atomically to ``OUTDIR/<id>.<format>`` and appends the record to
   ``OUTDIR/results.jsonl`` as it arrives.

The model files are read once by the driver and shipped through the object store, so the
workers need not see them; voice and prompt audio paths in rows are read by the workers
(on a multi-node cluster: a shared filesystem or the same path on every node).

Seeds come from the rows (or their ids), so a row's audio does not depend on which worker
or batch ran it. A worker that dies mid-batch is restarted and its batch run again
(``max_restarts`` / ``max_task_retries``): the rows it had finished are redone, and since
only the driver writes, from the records it receives, no row is written or recorded twice.
"""
# The pipeline's code lives in calm_fast.serve.batch, beside the job it runs, because the
# `calm-fast batch --ray` command dispatches to it and the package's import graph has no
# cycles (python_tests/test_layers.py); this module is its public face.
from calm_fast.serve.batch import PENDING, BatchWorker, run_ray  # noqa: F401

__all__ = ["BatchWorker", "run_ray", "PENDING"]
