"""Online training throughput: harvest+train vs harvest alone, on the same model and data, in one run.

Harvest alone is the plain forward with early stop after the trained layer (what feeding an SAE
costs at the least); harvest+train is ``vlmsae.train`` with one TopK SAE of width 16 x d_model.
Both are reported as buffered tokens per second and as their ratio.

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --device cuda --dtype bfloat16 --llava-7b --batch-size 16384
"""

from __future__ import annotations

import argparse

import torch

import vlmsae
from common import harvest_rate, llava_7b, timer
from vlmsae import zoo


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--family", default="llava", choices=zoo.FAMILIES)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--data-batch", type=int, default=16, help="images per forward")
    parser.add_argument("--batch-size", type=int, default=1024, help="tokens per SAE step")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--llava-7b", action="store_true", help="LLaVA-1.5-7B shapes with random weights (GPU)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    now = timer(device)
    if args.llava_7b:
        model, inputs = llava_7b(dtype, device, batch=args.data_batch)
        batches = [inputs] * 4
    else:
        model = zoo.tiny_model(args.family, n_layers=args.n_layers, d_model=args.d_model, vocab_size=4096)
        model = model.to(device, dtype)
        batches = [{k: v.to(device) for k, v in zoo.tiny_inputs(model, args.data_batch, text_len=96, seed=s).items()}
                   for s in range(8)]
    info = vlmsae.layers(model)
    layer = info.n_layers // 2
    buffer_size = 8 * args.batch_size

    def sae():
        return vlmsae.SAE(d_in=info.d_model, d_sae=16 * info.d_model, k=args.k, device=device)

    # warm-up both paths once
    vlmsae.train(model, layer, batches, sae(), steps=4, batch_size=args.batch_size, buffer_size=buffer_size,
                 progress=False)
    t0 = now()
    vlmsae.train(model, layer, batches, sae(), steps=args.steps, batch_size=args.batch_size,
                 buffer_size=buffer_size, progress=False)
    train_s = now() - t0
    trained_tokens = args.steps * args.batch_size  # every buffered row is read exactly once
    # the same forwards, nothing trained, until as many rows were kept, into buffers of half the size:
    # training refills half its buffer at a time (and drops the same overflow)
    harvest, _ = harvest_rate(model, layer, batches, trained_tokens, buffer_size // 2, now)
    train_rate = trained_tokens / train_s
    print(f"\ndevice {device}, dtype {args.dtype}, {type(model).__name__} d={info.d_model} "
          f"L={info.n_layers}, layer {layer}, SAE 16x k={args.k}, SAE batch {args.batch_size}")
    print(f"harvest alone (record, stop early): {harvest:,.0f} tokens/s")
    print(f"harvest + train ({args.steps} steps):  {train_rate:,.0f} tokens/s")
    print(f"ratio harvest+train / harvest: {train_rate / harvest:.2f} (goal >= 0.85)")


if __name__ == "__main__":
    main()
