"""Concept AUROC of demo-style SAEs on the shipped Shapes captioner, per layer, setting and seed.

For each combination: train a TopK SAE online as ``vlmsae demo`` does, then print one JSON line with
the weakest best-feature AUROC of every concept (``vlmsae.testbed.concepts.concept_auroc`` on fresh samples)
and the per-value AUROCs of colour and shape. Example (the sweep behind RESULTS.md)::

    python benchmarks/sweep_concepts.py --layers 2 3 --seeds 0 1 2
    python benchmarks/sweep_concepts.py --layers 2 --expansion 2 --k 16 --seeds 0 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from vlmsae.adapters import layers
from vlmsae.sae import SAE
from vlmsae.testbed import models, shapes
from vlmsae.testbed.concepts import concept_auroc
from vlmsae.testbed.data import ShapesData
from vlmsae.testbed.demo import CONCEPT_SEED
from vlmsae.train import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--samples", type=int, default=400, help="fresh Shapes samples for concept AUROC")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load_captioner()
    d_model = layers(model).d_model
    samples = shapes.make_samples(args.samples, CONCEPT_SEED)
    for layer, seed in itertools.product(args.layers, args.seeds):
        torch.manual_seed(seed)
        sae = SAE(d_in=d_model, d_sae=args.expansion * d_model, k=args.k)
        t0 = time.perf_counter()
        train(model, layer, ShapesData(tokenizer, batches=100_000, batch_size=64), sae, steps=args.steps,
              batch_size=1024, buffer_size=16384, k_start=4 * args.k, warmup_steps=min(50, args.steps // 10),
              seed=seed, progress=False)
        seconds = time.perf_counter() - t0
        table = concept_auroc(model, layer, sae, tokenizer, samples)
        weakest = {c: round(float(table.loc[c, "auroc"].min()), 3) for c in shapes.CONCEPTS}
        print(json.dumps({"layer": layer, "seed": seed, "expansion": args.expansion, "k": args.k,
                          "steps": args.steps, "weakest": weakest, "train_s": round(seconds),
                          **{c: table.loc[c, "auroc"].round(3).to_dict() for c in ("color", "shape")}}), flush=True)


if __name__ == "__main__":
    main()
