"""Data-parallel SAE steps: 2 ranks x 1 thread against 1 rank x 2 threads, at the same global batch.

Both variants train the same TopK SAE with Adam through ``SAETrainer``; the ranks under
``torchrun --standalone`` (gloo on CPU) each step on half of every global batch and all-reduce the
gradients and statistics (``vlmsae.distributed``); the single process steps on the whole batch
with two intra-op threads. The variants take turns, one launch each per round, and the median step
time over all rounds' timed steps is reported, with the ratio. On GPUs (``--device cuda``) the ranks
use NCCL, one GPU each (``--nproc`` of them), and the script prints tokens per second. On a machine with
one GPU, ``--one-gpu`` runs the ranks on that GPU over gloo (NCCL refuses two ranks on one device) against
one process on it: the ratio is the cost of the gradient all-reduce staged through the host, not a scaling
figure; the ranks also check that their SAEs end identical.

    python benchmarks/bench_distributed.py                         # CPU: d_in 512, d_sae 8192, k 32, batch 2048
    python benchmarks/bench_distributed.py --device cuda --nproc 8 --d-in 4096 --d-sae 65536 --k 64 --batch 65536
    python benchmarks/bench_distributed.py --device cuda --one-gpu --d-in 4096 --d-sae 65536 --k 64 --batch 16384
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """One variant: time ``args.steps`` SAE steps after one warm-up; rank 0 writes the step times to ``args.out``."""
    import torch

    from vlmsae import distributed
    from vlmsae.sae import SAE
    from vlmsae.trainer import SAETrainer

    torch.set_num_threads(args.threads)
    world = distributed.init_from_env(backend="gloo" if args.one_gpu else None)
    rank, size = (0, 1) if world is None else (world.rank, world.size)
    device = torch.device("cuda:0" if args.one_gpu else distributed.local_device(world, args.device))
    torch.manual_seed(0)
    sae = SAE(d_in=args.d_in, d_sae=args.d_sae, k=args.k, device=device)
    trainer = SAETrainer(sae, world=world, sync_every=10**9)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(args.batch, args.d_in, generator=g, device=device)
    mine = x[rank * args.batch // size:(rank + 1) * args.batch // size]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if world is not None:
            world.barrier()

    times = []
    for i in range(args.steps + 1):
        sync()
        t0 = time.perf_counter()
        trainer.step(mine)
        sync()
        if i:  # the first step is a warm-up (allocations, the first batch's init)
            times.append(time.perf_counter() - t0)
    if world is not None:  # the replicas must end identical (the spread of a digest over the ranks is 0)
        digest = torch.stack([p.detach().double().sum() for p in sae.parameters()]).cpu()
        spread = world.max_(digest.clone()) + world.max_(-digest.clone())
        if spread.abs().max() > 0:
            raise SystemExit(f"rank {rank}: the replicas differ after {args.steps + 1} steps ({spread.tolist()})")
    if rank == 0:
        Path(args.out).write_text(json.dumps(times))


def launch(args, nproc: int, threads: int, out: Path) -> list[float]:
    """Run one variant as its own process(es); its step times."""
    common = ["--worker", "--threads", str(threads), "--out", str(out), "--steps", str(args.steps),
              "--d-in", str(args.d_in), "--d-sae", str(args.d_sae), "--k", str(args.k), "--batch", str(args.batch),
              "--device", args.device] + (["--one-gpu"] if args.one_gpu else [])
    if nproc == 1:
        cmd = [sys.executable, __file__, *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               __file__, *common]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[-20:])} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one-gpu", action="store_true", help="ranks share the one GPU over gloo (see above)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the data-parallel variant")
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2048, help="global tokens per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per launch")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.one_gpu:
        variants = {f"{args.nproc} ranks on 1 GPU (gloo)": (args.nproc, 1), "1 rank on 1 GPU": (1, 1)}
    elif args.device == "cuda":
        variants = {f"{args.nproc} ranks x 1 GPU": (args.nproc, 1)}
    else:
        variants = {f"{args.nproc} ranks x 1 thread": (args.nproc, 1), f"1 rank x {args.nproc} threads": (1, args.nproc)}
    times = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (nproc, threads) in variants.items():
                times[name] += launch(args, nproc, threads, Path(tmp) / f"{r}-{nproc}.json")
    print(f"d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, global batch {args.batch}, device {args.device}, "
          f"{args.rounds} rounds x {args.steps} timed steps")
    print("| variant | median s/step | tokens/s |\n|---|---:|---:|")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, m in medians.items():
        print(f"| {name} | {m:.4f} | {args.batch / m:,.0f} |")
    if len(medians) == 2:
        (a, ma), (b, mb) = medians.items()
        print(f"ratio of step times, ({a}) / ({b}): {ma / mb:.2f}")


if __name__ == "__main__":
    main()
