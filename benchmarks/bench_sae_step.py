"""Throughput of one full TopK SAE training step: vlmsae vs sae-lens vs EleutherAI sparsify, and the dense floor.

Every variant trains on the same activations (written to a safetensors file for
the peers, which run in the interop venv: tests/interop/setup_venv.sh) with
Adam, at the same d_in / d_sae / k / batch. The variants take turns within every
round (the peers as long-lived workers), so drift in the machine hits them alike;
the median step time over all rounds is reported. The floor is the step's one
unavoidable dense matmul, the encoder forward x @ W_enc, timed in the same rounds.
With ``--dead N`` the same N latents are dead at every step on every side, so that
every side runs its AuxK loss (Gao et al. 2024 §A.2): vlmsae over the latents a
readout has seen dead (aux_k = d_in / 2, coefficient 1/32), sparsify with
``auxk_alpha`` 1/32, sae-lens with its default coefficient 1.0.
"vlmsae" is the step a user gets: `SAETrainer` at its defaults, which select the latents with a bf16 matmul
on CUDA and on a CPU with native bf16 (`vlmsae.trainer.default_compute_dtype`); ``--fp32-cpu`` adds the
float32 selection beside it. ``--load N`` keeps N busy processes running through the rounds (a loaded machine).

    python benchmarks/bench_sae_step.py                    # CPU: d_in 768, d_sae 24576, k 32, batch 4096
    python benchmarks/bench_sae_step.py --dead 3072        # the same, with an eighth of the latents dead
    python benchmarks/bench_sae_step.py --dead 3072 --peers sparsify --fp32-cpu --load 2    # under load
    python benchmarks/bench_sae_step.py --device cuda --d-in 4096 --d-sae 65536 --k 64 --batch 16384 --peers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlmsae.sae import SAE
from vlmsae.trainer import SAETrainer

REPO = Path(__file__).resolve().parents[1]
# Sparse-step ceiling at d=4096, n=65536, k=64 on an H200 (../shared/DESIGN.md, "Performance model").
H200_CEILING_TOKENS_PER_S = 1.3e6


class Peer:
    """A peer's training step in its own venv, timed on request."""

    def __init__(self, python: Path, name: str, activations: Path, d_sae: int, k: int, device: str):
        self.process = subprocess.Popen(
            [str(python), str(REPO / "benchmarks" / "peer_sae_step.py"), name, str(activations), str(d_sae), str(k), device],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self._read()  # "ready", after the peer's imports and its warm-up step

    def _read(self):
        for line in self.process.stdout:
            try:
                return json.loads(line)
            except json.JSONDecodeError:  # a peer's own import-time print
                continue
        raise RuntimeError(f"peer exited with {self.process.wait()}")

    def __call__(self, steps: int) -> list[float]:
        self.process.stdin.write(f"{steps}\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def timed(fn, steps: int, device: torch.device) -> list[float]:
    import time

    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=24576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--peers", nargs="*", default=["saelens", "sparsify"], help="none: vlmsae and the floor only")
    parser.add_argument("--fp32-cpu", action="store_true", help="also vlmsae with a float32 selection matmul on the CPU")
    parser.add_argument("--load", type=int, default=0, help="busy processes running through the rounds")
    parser.add_argument("--dead", type=int, default=0, help="latents dead at every step on every side (AuxK on)")
    parser.add_argument("--interop-python", type=Path, default=REPO / ".venv-interop" / "bin" / "python")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in, device=device)

    dead = torch.zeros(args.d_sae, dtype=torch.bool, device=device)
    dead[torch.randperm(args.d_sae, device=device)[:args.dead]] = True

    def vlmsae_step(trainer: SAETrainer):
        if not args.dead:
            return lambda: trainer.step(x)
        trainer.tokens_since_fired.masked_fill_(dead, trainer.sae.cfg.dead_tokens)
        trainer.read_metrics()  # a readout sees them dead: AuxK runs over them from now on

        def step():
            # the fixed dead set, as on the peers' side (a latent that fired in the main TopK dies again)
            trainer.tokens_since_fired.masked_fill_(dead, trainer.sae.cfg.dead_tokens)
            trainer.step(x)
        return step

    sae = SAE(d_in=args.d_in, d_sae=args.d_sae, k=args.k, device=device)
    trainer = SAETrainer(sae, sync_every=10**9)  # no readout inside the timed steps
    variants = {"vlmsae": vlmsae_step(trainer)}
    if args.fp32_cpu and device.type == "cpu" and trainer.compute_dtype != torch.float32:
        sae_fp32 = SAE(d_in=args.d_in, d_sae=args.d_sae, k=args.k, device=device)
        trainer_fp32 = SAETrainer(sae_fp32, sync_every=10**9, compute_dtype="float32")
        variants["vlmsae (fp32 selection)"] = vlmsae_step(trainer_fp32)
    W_enc = sae.W_enc.detach().clone()
    # The floor in the dtype of the default step's selection matmul (bf16 on CUDA and on a CPU with native bf16).
    floor_dtype = trainer.compute_dtype
    x_floor, W_floor = x.to(floor_dtype), W_enc.to(floor_dtype)
    floor_name = f"dense floor ({str(floor_dtype)[6:]} x @ W_enc)"
    variants[floor_name] = lambda: x_floor @ W_floor
    for fn in variants.values():
        fn()  # warm-up

    peers = {}
    with tempfile.TemporaryDirectory() as tmp, busy(args.load):
        if args.peers:
            if not args.interop_python.exists():
                sys.exit(f"no interop venv at {args.interop_python}: run tests/interop/setup_venv.sh, or pass --peers")
            save_file({"x": x.cpu()} | ({"dead": dead.cpu()} if args.dead else {}), Path(tmp) / "x.safetensors")
            for name in args.peers:
                peers[name] = Peer(args.interop_python, name, Path(tmp) / "x.safetensors", args.d_sae, args.k, args.device)
        times: dict[str, list[float]] = {name: [] for name in [*variants, *peers]}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                times[name] += timed(fn, args.steps, device)
            for name, peer in peers.items():
                times[name] += peer(args.steps)
        for peer in peers.values():
            peer.close()

    median = {name: statistics.median(ts) for name, ts in times.items()}
    ours, floor = median["vlmsae"], median[floor_name]
    print(f"\nTopK SAE training step, Adam: d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch} "
          f"on {args.device} ({torch.get_num_threads()} threads), median of {args.rounds}x{args.steps} steps, "
          + (f"AuxK on every side ({args.dead} latents dead)" if args.dead else "no dead latents (no AuxK)")
          + f"; vlmsae selects in {str(trainer.compute_dtype)[6:]}" + (f"; {args.load} busy processes" if args.load else ""))
    print(f"{'variant':32} {'s/step':>9} {'tokens/s':>11} {'time / vlmsae':>14}")
    for name, seconds in median.items():
        print(f"{name:32} {seconds:9.3f} {args.batch / seconds:11,.0f} {seconds / ours:13.2f}x")
    print(f"vlmsae / dense floor: {floor / ours:.2f} of the floor's tokens/s")
    for name in peers:
        print(f"vlmsae / {name} tokens/s{' with AuxK' if args.dead else ''}: {median[name] / ours:.2f}x")
    if device.type == "cuda":
        print(f"vlmsae / H200 ceiling ({H200_CEILING_TOKENS_PER_S:.1e} tokens/s): {args.batch / ours / H200_CEILING_TOKENS_PER_S:.2f}")


def spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def busy(n: int):
    """`n` processes spinning on a core each while the block runs (the loaded-machine case)."""
    workers = [multiprocessing.Process(target=spin, daemon=True) for _ in range(n)]
    for w in workers:
        w.start()
    try:
        yield
    finally:
        for w in workers:
            w.terminate()
            w.join()


if __name__ == "__main__":
    main()
