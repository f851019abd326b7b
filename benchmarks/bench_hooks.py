"""Cost of vlmsae's hooks on a live model: hooked / plain forward and generate, and the early-stop speedup.

Every ratio is measured in this one run: the variants are interleaved within each repeat (so drift in
the machine hits them alike) and the median over repeats is reported.

    python benchmarks/bench_hooks.py                      # CPU: every zoo family at a mid size
    python benchmarks/bench_hooks.py --device cuda --dtype bfloat16 --llava-7b   # lent GPU
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

import vlmsae
from common import add_model_args, cases, median_times, timer
from vlmsae import zoo


def bench_model(name, model, inputs, args, now) -> dict:
    info = vlmsae.layers(model)
    mid = info.n_layers // 2
    every = range(info.n_layers)

    @torch.no_grad()
    def plain():
        model(**inputs)

    @torch.no_grad()
    def one():
        with vlmsae.record(model, [mid]):
            model(**inputs)

    @torch.no_grad()
    def all_layers():
        with vlmsae.record(model, every):
            model(**inputs)

    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    @torch.no_grad()
    def generate():
        model.generate(**inputs, **gen)

    @torch.no_grad()
    def generate_recorded():
        with vlmsae.record(model, [mid]):
            model.generate(**inputs, **gen)

    t = median_times({"plain": plain, "one": one, "all": all_layers}, args.repeats, now)
    g = median_times({"plain": generate, "rec": generate_recorded}, max(3, args.repeats // 3), now)
    return {"model": name, "forward ms": 1e3 * t["plain"], "record 1 layer": t["one"] / t["plain"],
            f"record all {info.n_layers}": t["all"] / t["plain"], "generate ms": 1e3 * g["plain"],
            "record generate": g["rec"] / g["plain"]}


def bench_stop(args, device, dtype, now) -> tuple[float, float]:
    """Record layer 2 of a deep model with and without stopping after it."""
    model = zoo.tiny_model("llava", n_layers=args.deep_layers, d_model=args.d_model).to(device, dtype)
    inputs = {k: v.to(device) for k, v in zoo.tiny_inputs(model, args.batch, text_len=args.text_len).items()}

    @torch.no_grad()
    def full():
        with vlmsae.record(model, [2]):
            model(**inputs)

    @torch.no_grad()
    def early():
        with vlmsae.record(model, [2], stop=True):
            model(**inputs)

    with torch.no_grad(), vlmsae.record(model, [2]) as a:
        model(**inputs)
    with torch.no_grad(), vlmsae.record(model, [2], stop=True) as b:
        model(**inputs)
    assert torch.equal(a[2], b[2]), "early stop changed the recorded activations"
    t = median_times({"full": full, "early": early}, args.repeats, now)
    return t["full"] / t["early"], args.deep_layers


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--deep-layers", type=int, default=32)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    now = timer(device)
    torch.set_grad_enabled(False)
    rows = [bench_model(name, model, inputs, args, now) for name, model, inputs in cases(args, device, dtype)]
    speedup, deep = bench_stop(args, device, dtype, now)
    table = pd.DataFrame(rows).set_index("model")
    print(f"\ndevice {device}, dtype {args.dtype}, batch {args.batch}, text {args.text_len} tokens, "
          f"{args.new_tokens} new tokens, median of {args.repeats} interleaved repeats")
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"early stop after layer 2 of a {deep}-layer LLaVA (d={args.d_model}): {speedup:.2f}x faster than the full forward")


if __name__ == "__main__":
    main()
