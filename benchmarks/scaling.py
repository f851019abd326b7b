"""How the cost of training grows with the work: SAE step time against d_sae and k, online tokens/s against the
number of layers trained from one forward. Writes the two plotly figures (JSON, and HTML with ``--html``) and
prints the tables.

- **Step**: ``SAETrainer.step`` (TopK, Adam) on random activations, median seconds over ``--repeats`` steps, for
  each ``--d-sae`` at ``--k``, then each ``--ks`` at the middle ``--d-sae``; reported as tokens/s.
- **Layers**: ``vlmsae.train`` of one TopK SAE per layer (16 x d_model, k 32) on 1, 2, 4, ... of the zoo model's
  layers, all fed by the same forwards; reported as trained tokens/s summed over the layers, and per layer. The
  deepest layer trained is the last of the list, so the forward stops there.

    python benchmarks/scaling.py                                       # CPU: d_in 256, batch 1024
    python benchmarks/scaling.py --device cuda --d-in 4096 --batch 16384 --d-sae 16384 65536 262144 1048576 \\
        --d-model 1024 --html
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import plotly.graph_objects as go
import torch
from tqdm import tqdm

import vlmsae
from common import median_times, timer
from vlmsae import zoo
from vlmsae.files import write_text_atomic

HERE = Path(__file__).resolve().parent


def step_rate(d_in: int, d_sae: int, k: int, batch: int, repeats: int, device, now) -> float:
    """Tokens/s of one TopK training step at this size."""
    torch.manual_seed(0)
    trainer = vlmsae.SAETrainer(vlmsae.SAE(d_in=d_in, d_sae=d_sae, k=k, device=device), lr=1e-4,
                                init_from_first_batch=False)
    x = torch.randn(batch, d_in, device=device)
    seconds = median_times({"step": lambda: trainer.step(x)}, repeats, now)["step"]
    return batch / seconds


def layers_rate(model, layers: list[int], batches, batch_size: int, steps: int, now) -> float:
    """Trained tokens/s summed over ``layers``, each with its own SAE, from the same forwards."""
    d = vlmsae.layers(model).d_model
    device = next(model.parameters()).device
    saes = {L: vlmsae.SAE(d_in=d, d_sae=16 * d, k=32, device=device) for L in layers}
    t0 = now()
    vlmsae.train(model, layers, batches, saes, steps=steps, batch_size=batch_size, buffer_size=8 * batch_size,
                 progress=False)
    return steps * batch_size * len(layers) / (now() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, nargs="+", default=[16384, 65536, 262144, 1048576])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--batch", type=int, default=1024, help="tokens per SAE step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--d-model", type=int, default=256, help="width of the zoo LLaVA for the layers curve")
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=32, help="SAE steps per layer count")
    p.add_argument("--out", default=str(HERE / "scaling"), help="prefix of the .json (and .html) figures")
    p.add_argument("--html", action="store_true", help="also write the figures as one HTML page (plotly inline)")
    args = p.parse_args()
    device = torch.device(args.device)
    now = timer(device)

    by_width = {n: step_rate(args.d_in, n, args.k, args.batch, args.repeats, device, now)
                for n in tqdm(args.d_sae, desc="d_sae")}
    middle = sorted(args.d_sae)[len(args.d_sae) // 2]
    by_k = {k: step_rate(args.d_in, middle, k, args.batch, args.repeats, device, now) for k in tqdm(args.ks, desc="k")}

    model = zoo.tiny_model("llava", n_layers=args.n_layers, d_model=args.d_model, vocab_size=4096).to(device)
    batches = [{key: v.to(device) for key, v in zoo.tiny_inputs(model, 16, text_len=96, seed=s).items()}
               for s in range(8)]
    counts = [n for n in (1, 2, 4, 8, 16, 32) if n <= args.n_layers]
    layers_rate(model, [0], batches, args.batch, 4, now)  # warm-up
    by_layers = {n: layers_rate(model, list(range(args.n_layers - n, args.n_layers)), batches, args.batch,
                                args.steps, now) for n in tqdm(counts, desc="layers")}

    where = f"{device.type}, {time.strftime('%Y-%m-%d')}"
    step_fig = go.Figure([
        go.Scatter(x=list(by_width), y=list(by_width.values()), mode="lines+markers", name=f"k={args.k}, vs d_sae"),
        go.Scatter(x=[middle] * len(by_k), y=list(by_k.values()), mode="markers+text", name=f"d_sae={middle}, vs k",
                   text=[f"k={k}" for k in by_k], textposition="middle right"),
    ])
    step_fig.update_layout(title=f"SAE step (TopK, Adam), d_in {args.d_in}, batch {args.batch} ({where})",
                           xaxis_title="d_sae (latents)", yaxis_title="tokens / s", xaxis_type="log", yaxis_type="log")
    layer_fig = go.Figure([
        go.Scatter(x=counts, y=list(by_layers.values()), mode="lines+markers", name="all layers"),
        go.Scatter(x=counts, y=[r / n for n, r in by_layers.items()], mode="lines+markers", name="per layer"),
    ])
    layer_fig.update_layout(title=f"online training, zoo LLaVA d {args.d_model} ({where})",
                            xaxis_title="layers trained from one forward", yaxis_title="trained tokens / s",
                            xaxis_type="log")
    write_text_atomic(f"{args.out}.json", json.dumps({"step": json.loads(step_fig.to_json()),
                                                      "layers": json.loads(layer_fig.to_json())}))
    if args.html:
        write_text_atomic(f"{args.out}.html", step_fig.to_html(include_plotlyjs="inline")
                          + layer_fig.to_html(full_html=False, include_plotlyjs=False))
    print(f"\nSAE step, d_in {args.d_in}, batch {args.batch}, {where}")
    print("| d_sae | k | tokens/s |\n|---:|---:|---:|")
    for n, r in by_width.items():
        print(f"| {n:,} | {args.k} | {r:,.0f} |")
    for k, r in by_k.items():
        print(f"| {middle:,} | {k} | {r:,.0f} |")
    print(f"\nonline training, zoo LLaVA d {args.d_model}, {args.n_layers} layers, SAE 16x k 32, batch {args.batch}")
    print("| layers | tokens/s, all layers | tokens/s per layer |\n|---:|---:|---:|")
    for n, r in by_layers.items():
        print(f"| {n} | {r:,.0f} | {r / n:,.0f} |")
    print(f"\nwrote {args.out}.json" + (f" and {args.out}.html" if args.html else ""))


if __name__ == "__main__":
    main()
