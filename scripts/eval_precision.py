"""Does a weight mode keep what a trained model says? The same sentences and seeds through
`calm-fast batch` in each precision, then whisper's WER on each set (offline).

    python scripts/eval_precision.py --out runs/eval_precision [--modes fp32,bf16,int8]

With no --checkpoint/--vae the shipped default TTS speaks (its default voice). The
sentences are Harvard sentences (IEEE 1969), none of them in the training data's texts.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from calm_fast.evaluate.report import evaluate
from calm_fast.serve.batch import run_batch

SENTENCES = [
    "The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
    "It is easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.", "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.", "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.", "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.", "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.", "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.", "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.", "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.", "The swan dive was far short of perfect.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/eval_precision")
    ap.add_argument("--modes", default="fp32,bf16,int8")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--vae", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = out / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": f"s{i:02d}", "text": s, "seed": i}) + "\n"
                            for i, s in enumerate(SENTENCES)))
    print("mode  files  wer    cer    x_realtime")
    for mode in args.modes.split(","):
        job = run_batch(rows, out / mode, checkpoint=args.checkpoint, vae=args.vae,
                        precision=mode, progress=False)
        man = out / f"eval_{mode}.jsonl"
        man.write_text("".join(json.dumps({"path": f"{mode}/s{i:02d}.wav", "text": s}) + "\n"
                               for i, s in enumerate(SENTENCES)))
        s = evaluate(man, metrics=("wer",), progress=False)["summary"]
        print(f"{mode:5} {s['files']:5}  {s['wer']:.3f}  {s['cer']:.3f}  {job['rtf']}")


if __name__ == "__main__":
    main()
