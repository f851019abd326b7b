"""Cost of vlmsae's hooks on a live model: hooked / plain forward and generate, and the early-stop speedup.

Every ratio is measured in this one run: the variants are interleaved within each repeat (so drift in
the machine hits them alike) and the median over repeats is reported.

    python benchmarks/bench_hooks.py                      # CPU: every zoo family at a mid size
    python benchmarks/bench_hooks.py --device cuda --dtype bfloat16 --llava-7b   # lent GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vlmsae
from vlmsae import zoo


def timer(device: torch.device):
    def now():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


def median_times(variants: dict, repeats: int, now) -> dict[str, float]:
    """Median seconds of each variant, running them in turn within every repeat."""
    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = now()
            fn()
            times[name].append(now() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def llava_7b(dtype, device):
    """LLaVA-1.5-7B's shapes with random weights (a 7B decoder over 576 image tokens from a CLIP-L/336 tower)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                                max_position_embeddings=4096),
        image_token_index=32000, image_seq_length=576, vision_feature_layer=-2, pad_token_id=0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    batch, text = 4, 64
    ids = torch.randint(10, 32000, (batch, 1 + 576 + text))
    ids[:, 0] = 1
    ids[:, 1:577] = 32000
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(batch, 3, 336, 336, dtype=dtype)}
    return model, {k: v.to(device) for k, v in inputs.items()}


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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--families", nargs="+", default=list(zoo.FAMILIES))
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--deep-layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--llava-7b", action="store_true", help="also LLaVA-1.5-7B shapes, random weights (GPU)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    now = timer(device)
    torch.set_grad_enabled(False)
    rows = []
    for family in args.families:
        model = zoo.tiny_model(family, n_layers=args.n_layers, d_model=args.d_model, vocab_size=4096)
        model = model.to(device, dtype)
        inputs = {k: v.to(device) for k, v in zoo.tiny_inputs(model, args.batch, text_len=args.text_len,
                                                             padding="left").items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        rows.append(bench_model(f"{family} d={args.d_model} L={args.n_layers}", model, inputs, args, now))
        del model
    if args.llava_7b:
        model, inputs = llava_7b(dtype, device)
        rows.append(bench_model("llava-1.5-7b shapes", model, inputs, args, now))
        del model
    speedup, deep = bench_stop(args, device, dtype, now)
    import pandas as pd

    table = pd.DataFrame(rows).set_index("model")
    print(f"\ndevice {device}, dtype {args.dtype}, batch {args.batch}, text {args.text_len} tokens, "
          f"{args.new_tokens} new tokens, median of {args.repeats} interleaved repeats")
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"early stop after layer 2 of a {deep}-layer LLaVA (d={args.d_model}): {speedup:.2f}x faster than the full forward")


if __name__ == "__main__":
    main()
