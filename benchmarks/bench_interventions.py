"""Cost of interventions on a live model: splice (with / without the error term) and steer vs plain.

Forward and generate() times as ratios to the plain model, per family, measured in this one run
(variants interleaved within each repeat, median over repeats). The SAE is untrained (speed only)
with 8x expansion and k=32, on the model's device and in its dtype.

    python benchmarks/bench_interventions.py
    python benchmarks/bench_interventions.py --device cuda --dtype bfloat16 --llava-7b
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

import vlmsae
from common import add_model_args, cases, median_times, timer


def bench_model(name, model, inputs, args, now, device, dtype) -> dict:
    info = vlmsae.layers(model)
    layer = info.n_layers // 2
    sae = vlmsae.SAE(d_in=info.d_model, d_sae=args.expansion * info.d_model, k=32, device=device,
                     dtype=str(dtype).removeprefix("torch.")).eval()
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    contexts = {
        "plain": lambda: torch.no_grad(),
        "splice": lambda: vlmsae.splice(model, layer, sae),
        "splice+error": lambda: vlmsae.splice(model, layer, sae, use_error_term=True, edit=lambda z, f: z * 1.5),
        "steer": lambda: vlmsae.steer(model, layer, sae, {0: 4.0, 1: -2.0}),
    }

    def run(ctx, fn):
        def go():
            with torch.no_grad(), ctx():
                fn()
        return go

    fwd = median_times({k: run(c, lambda: model(**inputs)) for k, c in contexts.items()}, args.repeats, now)
    gen_t = median_times({k: run(c, lambda: model.generate(**inputs, **gen)) for k, c in contexts.items()},
                         max(3, args.repeats // 3), now)
    row = {"model": name, "forward ms": 1e3 * fwd["plain"], "generate ms": 1e3 * gen_t["plain"]}
    for k in ("splice", "splice+error", "steer"):
        row[f"{k} fwd"] = fwd[k] / fwd["plain"]
        row[f"{k} gen"] = gen_t[k] / gen_t["plain"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--expansion", type=int, default=8)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    now = timer(device)
    rows = [bench_model(name, model, inputs, args, now, device, dtype)
            for name, model, inputs in cases(args, device, dtype)]
    print(f"\ndevice {device}, dtype {args.dtype}, batch {args.batch}, text {args.text_len} tokens, "
          f"{args.new_tokens} new tokens, SAE {args.expansion}x k=32 at the middle layer, "
          f"median of {args.repeats} interleaved repeats; ratios to the plain model")
    print(pd.DataFrame(rows).set_index("model").to_string(float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
