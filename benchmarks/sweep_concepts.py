"""Concept AUROC of demo-style SAEs on the shipped Shapes captioner, per layer, setting and seed.

For each (layer, seed): train one SAE per setting online as ``vlmsae demo`` does, all from the same forwards
(a setting is an architecture, plain or with a Matryoshka width schedule; every SAE of a seed starts from the
weights that seed gives it alone), then print one JSON line per setting with the weakest best-latent AUROC of
every concept (``vlmsae.testbed.concepts.concept_auroc`` on fresh samples), the per-value AUROCs of colour and
shape, the dead fraction (fired on none of the last ``dead_window`` training tokens, the trainer's readout) and
FVU, L0 and dead on the demo's evaluation batches (``vlmsae.evaluate``). Examples (the sweeps behind RESULTS.md)::

    python benchmarks/sweep_concepts.py --layers 2 3 --seeds 0 1 2
    python benchmarks/sweep_concepts.py --layers 2 --expansion 2 --k 16 --seeds 0 1
    python benchmarks/sweep_concepts.py --layers 2 --seeds 0 1 2 3 4 --architecture topk batchtopk \\
        --matryoshka-widths none --matryoshka-widths 32 128

``--matryoshka-widths`` may be given several times, each a schedule (``none``: plain); every architecture is
trained with every schedule and every ``--dead-tokens`` window. The full width d_sae may be left out of a schedule (SAEConfig appends it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from vlmsae.adapters import layers
from vlmsae.evaluate import evaluate
from vlmsae.sae import SAE
from vlmsae.saeconfig import ARCHITECTURES
from vlmsae.testbed import models, shapes
from vlmsae.testbed.concepts import concept_auroc
from vlmsae.testbed.data import ShapesData
from vlmsae.testbed.demo import CONCEPT_SEED, EVAL_SEED, DemoConfig
from vlmsae.train import train


def schedule(words: list[str]) -> tuple[int, ...] | None:
    """One ``--matryoshka-widths`` occurrence: ``none`` or increasing integers."""
    return None if words == ["none"] else tuple(int(w) for w in words)


def main() -> None:
    demo = DemoConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--architecture", nargs="+", default=["topk"], choices=ARCHITECTURES)
    p.add_argument("--matryoshka-widths", nargs="+", action="append", metavar="W",
                   help="a width schedule, or none; repeat for several (default: none)")
    p.add_argument("--expansion", type=int, default=demo.expansion)
    p.add_argument("--k", type=int, default=demo.k, help="topk, batchtopk: latents per token")
    p.add_argument("--dead-tokens", type=int, nargs="+", default=[None],
                   help="one SAE per value: the dead window (tokens) that turns AuxK on (default SAEConfig's)")
    p.add_argument("--l1-coefficient", type=float, help="relu: the L1 weight (default SAEConfig's)")
    p.add_argument("--l0-coefficient", type=float, help="jumprelu: the L0 weight (default SAEConfig's)")
    p.add_argument("--steps", type=int, default=demo.steps)
    p.add_argument("--samples", type=int, default=demo.concept_samples, help="fresh Shapes samples for concept AUROC")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load_captioner()
    d_model = layers(model).d_model
    samples = shapes.make_samples(args.samples, CONCEPT_SEED)
    eval_data = ShapesData(tokenizer, batches=demo.eval_batches, batch_size=demo.data_batch, seed=EVAL_SEED)
    coefficients = {name: value for name, value in (("l1_coefficient", args.l1_coefficient),
                                                    ("l0_coefficient", args.l0_coefficient)) if value is not None}
    settings = list(itertools.product(args.architecture, [schedule(w) for w in args.matryoshka_widths or [["none"]]],
                                      args.dead_tokens))
    for layer, seed in itertools.product(args.layers, args.seeds):
        saes = []
        for architecture, widths, dead_tokens in settings:
            torch.manual_seed(seed)  # each SAE starts where it would if trained alone
            window = {} if dead_tokens is None else {"dead_tokens": dead_tokens}
            saes.append(SAE(d_in=d_model, d_sae=args.expansion * d_model, k=args.k, architecture=architecture,
                            matryoshka_widths=widths, **coefficients, **window))
        t0 = time.perf_counter()
        result = train(model, layer, ShapesData(tokenizer, batches=100_000, batch_size=demo.data_batch), saes,
                       steps=args.steps, batch_size=demo.batch_size, buffer_size=demo.buffer_size,
                       k_start=4 * args.k, warmup_steps=min(50, args.steps // 10), seed=seed, progress=False)
        seconds = time.perf_counter() - t0
        for i, ((architecture, widths, _), sae) in enumerate(zip(settings, saes)):
            last = [h for h in result.history if h["sae"] == i][-1]
            table = concept_auroc(model, layer, sae, tokenizer, samples)
            quality = evaluate(model, layer, sae, eval_data, where=["all"], ablations=False).loc["all"]
            print(json.dumps({
                "layer": layer, "seed": seed, "architecture": architecture,
                "matryoshka_widths": list(sae.cfg.matryoshka_widths or []), "expansion": args.expansion,
                "k": args.k, "dead_tokens": sae.cfg.dead_tokens, **coefficients, "steps": args.steps, "train_s": round(seconds), "saes_trained": len(saes),
                "weakest": {c: round(float(table.loc[c, "auroc"].min()), 3) for c in shapes.CONCEPTS},
                **{c: table.loc[c, "auroc"].round(3).to_dict() for c in ("color", "shape")},
                "color_latent": table.loc["color", "latent"].to_dict(),
                "dead": round(last["dead_fraction"], 4), "dead_window": last["dead_window"],
                "fvu": round(float(quality["fvu"]), 4), "l0": round(float(quality["l0"]), 2),
                "dead_eval": round(float(quality["dead"]), 4), "eval_tokens": int(quality["spliced_tokens"])}),
                flush=True)


if __name__ == "__main__":
    main()
