"""Online training throughput: harvest+train vs harvest alone and vs the two back to back, in one run.

Harvest alone is the plain forward with early stop after the trained layer (what feeding an SAE
costs at the least); harvest+train is ``vlmsae.train`` with one TopK SAE of width 16 x d_model;
the SAE step alone is a fresh ``SAETrainer`` stepping on rows of the same layer already in memory, at
the run's k schedule. Back to back is what harvest and step would give one after the other with nothing
between them: 1 / (1 / harvest + 1 / step). All in buffered tokens per second; the ratios are
harvest+train over harvest alone (the GPU goal, >= 0.85 for a 7B) and over back to back (the overhead of
everything that is neither the model nor the SAE: buffer writes and reads, readouts, Python; goal >= 0.95).
Alternating is that back to back done for real: a plain loop that fills a ``RingBuffer`` with early-stopped
forwards and steps a ``SAETrainer`` on its half-buffers in turn, nothing else (no readouts beyond the
trainer's own, no NaN markers, no schedules but k's). Harvest+train over alternating is vlmsae.train's own
overhead; alternating over back to back is what taking turns costs the model and the SAE themselves (on a
CPU, each evicts the other's weights from the caches).

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --device cuda --dtype bfloat16 --llava-7b --batch-size 16384
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch
from tqdm import tqdm

import vlmsae
from common import fill, harvest_rate, llava_7b, timer
from vlmsae import zoo
from vlmsae.train import RUN_SYNC_EVERY, OnlineRunConfig, k_at


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--family", default="llava", choices=zoo.FAMILIES)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--data-batch", type=int, default=16, help="images per forward")
    parser.add_argument("--batch-size", type=int, default=1024, help="tokens per SAE step")
    parser.add_argument("--steps", type=int, default=256,
                        help="SAE steps per online run (the first fill, a whole buffer, is part of its time)")
    parser.add_argument("--buffer-batches", type=int, default=16,
                        help="buffer rows in SAE batches (16: OnlineRunConfig's 65536 rows for batches of 4096)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three measurements; medians reported")
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
    buffer_size = args.buffer_batches * args.batch_size

    def sae():
        return vlmsae.SAE(d_in=info.d_model, d_sae=16 * info.d_model, k=args.k, device=device)

    # warm-up both paths once
    vlmsae.train(model, layer, batches, sae(), steps=4, batch_size=args.batch_size, buffer_size=buffer_size,
                 progress=False)
    rows = buffered_rows(model, layer, batches, buffer_size, args.batch_size)
    trained_tokens = args.steps * args.batch_size  # every buffered row is read exactly once
    rates = {"harvest": [], "step": [], "train": [], "alternating": []}
    for _ in tqdm(range(args.rounds), desc="rounds"):  # the three take turns, so drift hits them alike
        t0 = now()
        vlmsae.train(model, layer, batches, sae(), steps=args.steps, batch_size=args.batch_size,
                     buffer_size=buffer_size, progress=False)
        rates["train"].append(trained_tokens / (now() - t0))
        # the same forwards, nothing trained, until as many rows were kept, into buffers of half the size:
        # training refills half its buffer at a time (and drops the same overflow)
        rates["harvest"].append(harvest_rate(model, layer, batches, trained_tokens, buffer_size // 2, now)[0])
        rates["step"].append(step_alone(rows, sae(), args, now))
        rates["alternating"].append(alternating(model, layer, batches, sae(), args, buffer_size, now))
    harvest, step_rate, train_rate, alternate = (statistics.median(rates[name])
                                                 for name in ("harvest", "step", "train", "alternating"))
    back_to_back = 1 / (1 / harvest + 1 / step_rate)
    # each round's own ratio (its three measurements taken one after the other), against drift between rounds
    round_ratios = [t * (1 / h + 1 / s) for h, s, t in zip(rates["harvest"], rates["step"], rates["train"])]
    print(f"\ndevice {device}, dtype {args.dtype}, {type(model).__name__} d={info.d_model} "
          f"L={info.n_layers}, layer {layer}, SAE 16x k={args.k}, SAE batch {args.batch_size}, "
          f"{args.steps} steps, median of {args.rounds} rounds")
    print(f"harvest alone (record, stop early): {harvest:,.0f} tokens/s")
    print(f"SAE step alone:                      {step_rate:,.0f} tokens/s")
    print(f"back to back (1 / (1/harvest + 1/step)): {back_to_back:,.0f} tokens/s")
    print(f"harvest + train:                     {train_rate:,.0f} tokens/s")
    print(f"ratio harvest+train / harvest: {train_rate / harvest:.2f} (GPU goal for a 7B: >= 0.85)")
    print(f"ratio harvest+train / back to back: {train_rate / back_to_back:.2f} (goal >= 0.95); by round: "
          + ", ".join(f"{r:.2f}" for r in round_ratios))
    print(f"alternating (harvest and step in turn, a plain loop): {alternate:,.0f} tokens/s")
    print(f"ratio alternating / back to back: {alternate / back_to_back:.2f}; by round: "
          + ", ".join(f"{a * (1 / h + 1 / s):.2f}" for h, s, a in zip(rates["harvest"], rates["step"],
                                                                      rates["alternating"])))
    print(f"ratio harvest+train / alternating: {train_rate / alternate:.2f}; by round: "
          + ", ".join(f"{t / a:.2f}" for t, a in zip(rates["train"], rates["alternating"])))


def buffered_rows(model, layer: int, batches, buffer_size: int, batch_size: int) -> list[torch.Tensor]:
    """A full buffer's worth of shuffled rows of `layer` over `batches`, as SAE batches of `batch_size`."""
    info = vlmsae.layers(model)
    buffer = vlmsae.RingBuffer(buffer_size, info.d_model, device=next(model.parameters()).device)
    fill(model, layer, batches, buffer, itertools.count())
    return [r.acts for r in buffer.read(batch_size)]

def step_alone(rows: list[torch.Tensor], sae, args, now) -> float:
    """Tokens/s of `args.steps` SAETrainer steps on `sae` over `rows` (reused in turn), at the k schedule of
    vlmsae.train's defaults (k_start, anneal) and its readout cadence."""
    cfg = OnlineRunConfig(steps=args.steps)
    schedule = [k_at(step, args.k, cfg, sae.cfg.d_sae) for step in range(args.steps)]
    trainer = vlmsae.SAETrainer(sae, sync_every=RUN_SYNC_EVERY)
    t0 = now()
    for step in range(args.steps):
        trainer.step(rows[step % len(rows)], k=schedule[step])
    return args.steps * args.batch_size / (now() - t0)

def alternating(model, layer: int, batches, sae, args, buffer_size: int, now) -> float:
    """Tokens/s of `args.steps` steps taken in turn with the forwards that feed them, as vlmsae.train takes
    them (a full buffer first, then half a buffer between read phases), in a plain loop of RingBuffer,
    record and SAETrainer.step at the run's k schedule and readout cadence."""
    cfg = OnlineRunConfig(steps=args.steps)
    schedule = [k_at(step, args.k, cfg, sae.cfg.d_sae) for step in range(args.steps)]
    trainer = vlmsae.SAETrainer(sae, sync_every=RUN_SYNC_EVERY)
    buffer = vlmsae.RingBuffer(buffer_size, sae.cfg.d_in, device=next(model.parameters()).device)
    step, forwards = 0, itertools.count()
    t0 = now()
    while step < args.steps:
        fill(model, layer, batches, buffer, forwards)
        for rows in buffer.read(args.batch_size):
            if step == args.steps:
                break
            trainer.step(rows.acts, k=schedule[step])
            step += 1
    return args.steps * args.batch_size / (now() - t0)


if __name__ == "__main__":
    main()
