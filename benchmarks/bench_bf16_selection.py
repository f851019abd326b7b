"""Quality of the bf16 selection matmul against the float32 one (issue 17 item 1): FVU and planted features.

On a CPU with native bf16 dot products `SAETrainer` ranks the latents with a bf16 matmul by default and
recomputes the chosen latents' values in float32 (`vlmsae.trainer.default_compute_dtype`). This trains
the same SAE (same seed, same initialisation, same sample stream) with ``compute_dtype="float32"`` and
``"bfloat16"`` on planted features: ``n_true`` random unit directions in ``d_in`` dimensions, each sample a
sum of about ``true_l0`` of them (Zipf-like firing rates, magnitudes uniform in [0.5, 1.5]) plus Gaussian
noise. It reports, per seed and on the mean over seeds, the FVU on held-out samples and the recovery of
the planted directions (mean over true features of the best decoder row's cosine; the fraction above 0.9),
and the ratio bf16 / float32 of each. The goal: every ratio within 1% of 1.

    python benchmarks/bench_bf16_selection.py                        # d_in 256, 3072 planted, d_sae 4096, k 16
    python benchmarks/bench_bf16_selection.py --kind batchtopk --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from vlmsae import metrics
from vlmsae.sae import SAE
from vlmsae.trainer import SAETrainer


class Planted:
    """A stream of samples (n, d_in) built from `n_true` unit directions, reproducible from `seed`."""

    def __init__(self, d_in: int, n_true: int, true_l0: float, noise: float, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.directions = torch.nn.functional.normalize(torch.randn(n_true, d_in, generator=g), dim=1)
        rate = 1.0 / torch.arange(1, n_true + 1, dtype=torch.float32) ** 0.5  # Zipf-like, exponent 0.5
        self.p = (rate * true_l0 / rate.sum()).clamp(max=1.0)
        self.noise = noise
        self.generator = torch.Generator().manual_seed(seed + 1)

    def __call__(self, n: int) -> torch.Tensor:
        g = self.generator
        active = torch.rand(n, self.p.shape[0], generator=g) < self.p
        magnitude = torch.rand(n, self.p.shape[0], generator=g) + 0.5
        x = (active * magnitude) @ self.directions
        return x + self.noise * torch.randn(x.shape, generator=g)


def train(args, seed: int, compute_dtype: str) -> dict:
    data = Planted(args.d_in, args.n_true, args.true_l0, args.noise, seed)
    held_out = data(args.eval_samples)
    torch.manual_seed(seed)
    sae = SAE(d_in=args.d_in, d_sae=args.d_sae, k=args.k, architecture=args.kind)
    trainer = SAETrainer(sae, compute_dtype=compute_dtype, lr=args.lr)
    start = time.perf_counter()
    for _ in tqdm(range(args.steps), desc=f"seed {seed} {compute_dtype}", leave=False):
        trainer.step(data(args.batch))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        sae.eval()
        recon = sae(held_out).recon
        fvu = float(metrics.fvu(held_out, recon))
        decoder = torch.nn.functional.normalize(sae.W_dec, dim=1)
        best = (data.directions @ decoder.T).max(dim=1).values
    return {"fvu": fvu, "mean_max_cos": float(best.mean()), "recovered": float((best > 0.9).float().mean()),
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="topk", choices=["topk", "batchtopk"])
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--n-true", type=int, default=3072, help="planted directions")
    parser.add_argument("--true-l0", type=float, default=16.0, help="mean planted directions per sample")
    parser.add_argument("--noise", type=float, default=0.05, help="std of the Gaussian noise per dimension")
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-samples", type=int, default=16384)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.kind}: d_in {args.d_in}, {args.n_true} planted directions (L0 {args.true_l0}, noise {args.noise}), "
          f"d_sae {args.d_sae}, k {args.k}, {args.steps} steps of {args.batch}, lr {args.lr}, {args.threads} threads")
    dtypes = ("float32", "bfloat16")
    rows = {d: [] for d in dtypes}
    print(f"{'seed':>4} {'selection':>9} {'FVU':>8} {'mean max cos':>12} {'recovered':>9} {'s':>6}")
    for seed in args.seeds:
        for dtype in dtypes:
            r = train(args, seed, dtype)
            rows[dtype].append(r)
            print(f"{seed:>4} {dtype:>9} {r['fvu']:>8.4f} {r['mean_max_cos']:>12.4f} {r['recovered']:>9.3f} "
                  f"{r['seconds']:>6.1f}")
    mean = {d: {m: statistics.mean(r[m] for r in rows[d]) for m in rows[d][0]} for d in dtypes}
    for dtype in dtypes:
        m = mean[dtype]
        print(f"mean {dtype:>9} {m['fvu']:>8.4f} {m['mean_max_cos']:>12.4f} {m['recovered']:>9.3f} {m['seconds']:>6.1f}")
    for metric in ("fvu", "mean_max_cos", "recovered"):
        ratio = mean["bfloat16"][metric] / mean["float32"][metric]
        verdict = "within 1%" if abs(ratio - 1) <= 0.01 else "NOT within 1%"
        print(f"bf16 / float32 {metric}: {ratio:.4f} ({verdict})")
    print(f"bf16 / float32 step time: {mean['bfloat16']['seconds'] / mean['float32']['seconds']:.2f}")


if __name__ == "__main__":
    main()
