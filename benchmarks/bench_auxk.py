"""Where the dense AuxK pass beats the sparse one: SAETrainer steps with AuxK dense, sparse, and off.

A fixed set of latents is dead at every step (re-marked before each step, as a live run's counters would
keep them) and a readout has seen them, so AuxK (Gao et al. 2024 §A.2) runs over them; the variants take
turns in every round and the median step time is reported. The dense pass costs about n_dead / aux_k
times what it costs at n_dead = aux_k, the sparse one about the same at every n_dead: the ratio of the
two over n_dead / aux_k gives ``vlmsae.trainer.DENSE_AUXK_FACTOR`` for the device.

    python benchmarks/bench_auxk.py                                   # CPU: d_in 768, d_sae 24576, k 32, batch 4096
    python benchmarks/bench_auxk.py --d-in 64 --d-sae 2048 --k 8 --batch 1024 --dead 64 256   # a small case
    python benchmarks/bench_auxk.py --device cuda --d-in 4096 --d-sae 65536 --k 64 --batch 16384 --dead 2048 8192 32768
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from vlmsae.sae import SAE
from vlmsae.trainer import SAETrainer


def auxk_step(sae: SAE, x: torch.Tensor, dead: torch.Tensor | None, factor: float):
    """A step of a fresh trainer on `sae` with `dead` (d_sae,) bool dead at every step (None: AuxK off)."""
    trainer = SAETrainer(sae, sync_every=10**9, dense_auxk_factor=factor)  # no readout inside the timed steps
    if dead is None:
        return lambda: trainer.step(x)
    trainer.tokens_since_fired.masked_fill_(dead, sae.cfg.dead_tokens)
    trainer.read_metrics()  # the readout that makes them AuxK's candidates

    def step():
        trainer.tokens_since_fired.masked_fill_(dead, sae.cfg.dead_tokens)
        trainer.step(x)
    return step


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=24576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dead", type=int, nargs="+", default=[1000, 3000], help="dead latents, one case each")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in, device=device)
    order = torch.randperm(args.d_sae, device=device)
    variants = {"no AuxK": auxk_step(SAE(d_in=args.d_in, d_sae=args.d_sae, k=args.k, device=device), x, None, 0)}
    for n_dead in args.dead:
        dead = torch.zeros(args.d_sae, dtype=torch.bool, device=device)
        dead[order[:n_dead]] = True
        for path, factor in (("sparse", 0.0), ("dense", math.inf)):
            sae = SAE(d_in=args.d_in, d_sae=args.d_sae, k=args.k, device=device)
            variants[f"{path} AuxK, {n_dead} dead"] = auxk_step(sae, x, dead, factor)
    for fn in variants.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    median = {name: statistics.median(ts) for name, ts in times.items()}

    aux_k = sae.cfg.aux_k
    base = median["no AuxK"]
    print(f"\nSAETrainer step with AuxK: d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch} "
          f"aux_k={aux_k} on {args.device} ({torch.get_num_threads()} threads), median of {args.rounds} rounds")
    print(f"{'variant':28} {'ms/step':>9} {'AuxK ms':>9}")
    for name, seconds in median.items():
        print(f"{name:28} {1e3 * seconds:9.1f} {1e3 * (seconds - base):9.1f}")
    for n_dead in args.dead:
        sparse, dense = (median[f"{p} AuxK, {n_dead} dead"] - base for p in ("sparse", "dense"))
        print(f"{n_dead} dead = {n_dead / aux_k:.2f} aux_k: AuxK pass dense / sparse = {dense / sparse:.2f}")


if __name__ == "__main__":
    main()
