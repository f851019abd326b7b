"""SynthSAEBench-16k, against SAELens on its own ground (issue 15 item 5).

SAELens's own generator builds the benchmark's synthetic model from its published config
(16,384 ground-truth features in 768 dimensions, Zipfian firing, a mutually exclusive hierarchy,
low-rank correlations; SAELens docs ``synth_sae_bench.md``, arXiv 2602.14687) in the interop venv
(``benchmarks/synth_sae_bench_peer.py``; no hub: the model is built, then cached). It streams the
training samples in chunks; on every chunk vlmsae's ``SAETrainer`` trains a BatchTopK and a
Matryoshka BatchTopK SAE, and SAELens's own ``SAETrainer`` trains its two, at the same samples,
batch (1024), learning rate (3e-4, SAELens's benchmark setting), width and k. The two sides take
turns within every chunk (who goes first alternates), so the load of a shared machine hits both
alike; the wall time is each trainer's own steps. SAELens's ``eval_sae_on_synthetic_data`` then
scores the four saved folders on one held-out sample set: MCC, F1, uniqueness, explained variance,
L0 and dead latents, once encoding with batch top-k over batches of 1024 (as SAELens's
``SyntheticSAERunner`` scores its trained SAE, the published figures) and once with the folder's
JumpReLU threshold (the saved inference model).

vlmsae's settings are what a user sets to match SAELens's run: the batch, SAELens's dead window
(1000 steps of 1024 samples) as ``dead_tokens``, the Matryoshka widths of the benchmark's experiments
(128, 512, 2048, 4096); the rest are vlmsae's defaults, its learning rate among them (Gao et al.'s
2e-4 / sqrt(width / 2**14): 4e-4 at width 4096). The two learning rates do not mean the same step:
SAELens starts its decoder rows at norm 0.1 and divides activations by their norm (so Adam turns its
directions about ten times faster per step, slowing as the norms grow), vlmsae keeps them at norm 1.

    python benchmarks/synth_sae_bench.py --samples 3000000          # width 4096, k 25
    python benchmarks/synth_sae_bench.py --model tiny --samples 4096 --width 64 --k 4 --eval-samples 2048  # smoke

A long run keeps its state with ``--state DIR`` (vlmsae's side only, ``--no-saelens``): after every score the
trainers (`SAETrainer.state_dict`: weights, Adam, dead counters), the sample stream's RNG state, the samples and
seconds so far and every score are written to DIR (atomically); the same command resumes from there, so a run
of tens of millions of samples can go on over several sittings:

    python benchmarks/synth_sae_bench.py --no-saelens --kinds matryoshka --samples 40000000 --score-every 2000000 \
        --state runs/synth --json runs/synth/scores.json

Without SAELens's trainers the worker draws the next chunk while vlmsae trains on this one (on two cores the
generator, about 1 s of a core per 1024 samples, is the limit: vlmsae's Matryoshka step needs a fifth of that).

On a GPU (``--device cuda``) SAELens's generator, its evaluation and every SAE run in this process on the device,
the chunks handed over as tensors (``--in-process``: sae_lens must import beside vlmsae, as on the lent GPU
machine with the carried wheels, ``benchmarks/gpu_wheels.sh``). The synthetic model is then built there from the
same config and seed (the GPU's random numbers: another draw of the same benchmark). ``--budget-s`` bounds the
sitting (the chunk under way is the last, then the scores), so the run fits a device call:

    python3 benchmarks/synth_sae_bench.py --device cuda --no-saelens --kinds matryoshka --samples 200000000 \
        --chunk 262144 --draw-batch 16384 --score-every 25000000 --budget-s 240 --json $OUT/synth.json

The interop interpreter is ``--interop-python``, else $VLMSAE_INTEROP_PYTHON, else ``.venv-interop``
(tests/interop/setup_venv.sh). Published (SAELens, 200M samples, L0 25, width 4096): Matryoshka
F1 0.879 / MCC 0.793, BatchTopK F1 0.732 / MCC 0.757.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vlmsae.files import write_folder_atomic, write_text_atomic
from vlmsae.sae import SAE
from vlmsae.trainer import SAETrainer

REPO = Path(__file__).resolve().parents[1]
KINDS = ("batchtopk", "matryoshka")
SAELENS_DEAD_STEPS = 1000
"""SyntheticSAERunnerConfig.dead_feature_window: a latent is dead after this many batches without firing."""
PUBLISHED = {"batchtopk": {"f1": 0.7316, "mcc": 0.7574, "uniqueness": 0.9837, "explained_variance": 0.7923},
             "matryoshka": {"f1": 0.8793, "mcc": 0.7927, "uniqueness": 0.9987, "explained_variance": 0.7792}}
"""SAELens's figures at L0 25, width 4096, 200M samples (docs/synth_sae_bench.md, mean of 5 seeds)."""


class Peer:
    """SAELens's side in the interop venv: one JSON request per line, one JSON answer per line."""

    local = False

    def __init__(self, python: Path):
        self.process = subprocess.Popen([str(python), str(REPO / "benchmarks" / "synth_sae_bench_peer.py")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, op: str, **fields) -> dict:
        self.send(op, **fields)
        return self.receive(op)

    def send(self, op: str, **fields) -> None:
        """A request whose answer ``receive`` reads later: the worker works on it meanwhile."""
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()

    def receive(self, op: str) -> dict:
        for line in self.process.stdout:
            try:
                return json.loads(line)
            except json.JSONDecodeError:  # a print from a library's import
                continue
        raise RuntimeError(f"the SAELens worker exited with {self.process.wait()} during {op!r}")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


class LocalPeer:
    """SAELens's side in this process (``--in-process``, where sae_lens imports beside vlmsae): the worker's requests
    as calls of its ``Peer``, in order; the chunks stay tensors on the device, with no files between."""

    local = True

    def __init__(self, device: str):
        spec = importlib.util.spec_from_file_location("synth_sae_bench_peer", REPO / "benchmarks" / "synth_sae_bench_peer.py")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ImportError as error:
            sys.exit(f"--in-process (and --device {device}) needs sae_lens importable beside vlmsae, which failed: "
                     f"{error}. On the GPU machine put the carried wheels on PYTHONPATH; on a CPU, leave out "
                     "--in-process to run SAELens in the interop venv")
        self.peer, self.pending = module.Peer(device), []

    def __call__(self, op: str, **fields) -> dict:
        if op == "threads":
            torch.set_num_threads(fields["n"])
            return {}
        return getattr(self.peer, op)(**fields)

    def send(self, op: str, **fields) -> None:
        self.pending.append((op, fields))

    def receive(self, op: str) -> dict:
        op, fields = self.pending.pop(0)
        return self(op, **fields)

    def close(self) -> None:
        pass


def vlmsae_trainer(kind: str, d_in: int, args) -> SAETrainer:
    torch.manual_seed(args.seed)
    # the benchmark experiments' 128, 512, 2048 at width 4096; in proportion at other widths
    widths = sorted({w for w in (args.width // 32, args.width // 8, args.width // 2) if w >= 1})
    sae = SAE(d_in=d_in, d_sae=args.width, architecture="batchtopk", k=args.k,
              matryoshka_widths=widths if kind == "matryoshka" else None,
              dead_tokens=SAELENS_DEAD_STEPS * args.batch, device=args.device)
    return SAETrainer(sae, lr=args.vlmsae_lr)


class Bench:
    """Both sides on one sample stream: each chunk trains every SAE, the sides taking turns; scores on request."""

    def __init__(self, args, peer: Peer, d_in: int, tmp: Path):
        self.args, self.peer, self.tmp = args, peer, tmp
        self.impls = ("vlmsae", "SAELens") if args.saelens else ("vlmsae",)
        self.ours = {kind: vlmsae_trainer(kind, d_in, args) for kind in args.kinds}
        self.seconds = {(kind, impl): 0.0 for kind in args.kinds for impl in self.impls}
        self.samples = 0
        self.scores: list[dict] = []
        self.drawing: int | None = None  # the chunk the worker is drawing ahead, if any

    def train_chunk(self, index: int, n: int, ahead: int = 0) -> None:
        """Train every SAE on chunk ``index`` (n samples). With ``ahead`` > 0 the worker draws the next chunk (that
        many samples) while vlmsae trains on this one: only without SAELens's trainers (who would then wait on the
        draw, a load vlmsae's steps would not share) and never before a state is saved (the stream's state must not
        run ahead of the samples trained)."""
        def path(index: int) -> str | None:  # in-process, the chunk comes back as a tensor
            return None if self.peer.local else str(self.tmp / f"chunk{index % 2}.safetensors")

        if self.drawing != index:
            self.peer.send("chunk", n=n, path=path(index))
        answer = self.peer.receive("chunk")
        x = answer["x"] if self.peer.local else load_file(path(index))["x"]
        self.drawing = None
        if ahead:
            self.peer.send("chunk", n=ahead, path=path(index + 1))
            self.drawing = index + 1
        for kind in self.args.kinds:
            for impl in self.impls if index % 2 == 0 else self.impls[::-1]:
                if impl == "SAELens":
                    data = {"x": x} if self.peer.local else {"path": path(index)}
                    self.seconds[kind, impl] += self.peer("train", kind=kind, **data)["seconds"]
                    continue
                t0 = time.perf_counter()
                for batch in x.split(self.args.batch):
                    self.ours[kind].step(batch)
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)
                self.seconds[kind, impl] += time.perf_counter() - t0
        self.samples += n

    def score(self) -> list[dict]:
        """Save every SAE as it stands and let SAELens score them; returns (and keeps) the rows."""
        for kind, trainer in self.ours.items():
            trainer.stored.save(self.tmp / f"vlmsae-{kind}")
        if self.args.saelens:
            self.peer("save", folders={kind: str(self.tmp / f"SAELens-{kind}") for kind in self.args.kinds})
        saes = [[f"{impl}-{kind}", str(self.tmp / f"{impl}-{kind}"), self.args.k]
                for kind in self.args.kinds for impl in self.impls]
        rows = self.peer("score", saes=saes)["results"]
        for row in rows:
            kind, impl = row["name"].split("-")[1], row["name"].split("-")[0]
            row.update(kind=kind, impl=impl, samples=self.samples, seconds=self.seconds[kind, impl])
        self.scores += rows
        if self.args.json:  # every score so far, so that a long run stopped early keeps them
            write_text_atomic(self.args.json, json.dumps({"args": {k: str(v) for k, v in vars(self.args).items()},
                                                          "scores": self.scores}, indent=2))
        return rows

    def run(self) -> list[dict]:
        """Train on the whole budget (from a saved state's samples on), scoring every ``score_every`` samples and
        at the end; returns the last scores. With ``budget_s``, the chunk under way when that many seconds of this
        sitting have passed is the last."""
        args = self.args
        first, t0 = True, time.perf_counter()
        with tqdm(total=args.samples, initial=self.samples, unit="sample", unit_scale=True, desc="training") as bar:
            for index, start in enumerate(range(self.samples, args.samples, args.chunk), start=self.samples // args.chunk):
                end = min(start + args.chunk, args.samples)
                last = end == args.samples or bool(args.budget_s and time.perf_counter() - t0 > args.budget_s)
                # at the first chunk boundary at or past each multiple of score_every (chunks need not divide it)
                passed = args.score_every and end // args.score_every > start // args.score_every
                ahead = 0 if args.saelens or passed or last else min(args.chunk, args.samples - end)
                self.train_chunk(index, end - start, ahead)
                bar.update(self.samples - bar.n)
                bar.set_postfix({f"{kind[:3]} {impl}": f"{s:.0f}s" for (kind, impl), s in self.seconds.items()})
                if last:
                    break
                if passed:
                    tqdm.write(table(self.score(), header=first))
                    first = False
                    self.save_state()
        rows = self.score()
        self.save_state()
        return rows

    RESUMED_ARGS = ("model", "width", "k", "seed", "batch", "vlmsae_lr", "chunk", "kinds", "eval_samples", "device",
                    "draw_batch")

    def save_state(self) -> None:
        """With ``--state``: everything a resumed run needs, swapped in whole (the previous state stays until then)."""
        if self.args.state is None:
            return
        stream = self.peer("stream_state")["state"]

        def write(folder: Path) -> None:
            metas = {}
            for kind, trainer in self.ours.items():
                tensors, metas[kind] = trainer.state_dict()
                save_file({name: t.cpu() for name, t in tensors.items()}, folder / f"vlmsae-{kind}.safetensors")
            (folder / "state.json").write_text(json.dumps({
                "args": {name: getattr(self.args, name) for name in self.RESUMED_ARGS}, "samples": self.samples,
                "seconds": {kind: s for (kind, _), s in self.seconds.items()}, "scores": self.scores,
                "trainers": metas, "stream": stream}))
        write_folder_atomic(self.args.state, write)

    def load_state(self) -> None:
        """Resume from ``--state`` if it holds a run; SystemExit if that run's settings differ from these."""
        path = self.args.state / "state.json" if self.args.state else None
        if path is None or not path.is_file():
            return
        state = json.loads(path.read_text())
        ours = {name: getattr(self.args, name) for name in self.RESUMED_ARGS}
        if state["args"] != json.loads(json.dumps(ours)):
            sys.exit(f"--state {self.args.state} holds a run with {state['args']}, not {ours}: pass another --state "
                     "or the same settings")
        for kind, trainer in self.ours.items():
            tensors = load_file(self.args.state / f"vlmsae-{kind}.safetensors", device=self.args.device)
            trainer.load_state_dict(tensors, state["trainers"][kind],
                                    source=str(self.args.state))
        self.peer("set_stream", state=state["stream"])
        self.samples, self.scores = state["samples"], state["scores"]
        self.seconds = {(kind, "vlmsae"): s for kind, s in state["seconds"].items()}
        print(f"resumed from {self.args.state} at {self.samples:,} samples", file=sys.stderr)


def table(rows: list[dict], header: bool = True, published: bool = False) -> str:
    lines = ["| kind | implementation | encode | samples | train s | MCC | F1 | uniqueness | expl. var. | L0 | dead |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"] if header else []
    for kind in KINDS:
        for r in (r for r in rows if r["kind"] == kind):
            lines.append(f"| {kind} | {r['impl']} | {r['encode']} | {r['samples']:,} | {r['seconds']:,.0f} | "
                         f"{r['mcc']:.3f} | {r['f1']:.3f} | {r['uniqueness']:.3f} | {r['explained_variance']:.3f} | "
                         f"{r['l0']:.1f} | {r['dead']} |")
        if published and any(r["kind"] == kind for r in rows):
            p = PUBLISHED[kind]
            lines.append(f"| {kind} | SAELens, published | batch top-k | 200,000,000 | | {p['mcc']:.3f} | "
                         f"{p['f1']:.3f} | {p['uniqueness']:.3f} | {p['explained_variance']:.3f} | 25 | |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's goals, per kind, on the batch top-k scores (those the published figures use)."""
    score = {(r["impl"], r["kind"]): r for r in rows if r["encode"] == "batch top-k"}
    lines = []
    for kind in KINDS:
        if ("SAELens", kind) not in score or ("vlmsae", kind) not in score:
            continue
        ours, theirs = score["vlmsae", kind], score["SAELens", kind]
        lines.append(f"{kind}: F1 {ours['f1'] - theirs['f1']:+.3f}, MCC {ours['mcc'] - theirs['mcc']:+.3f} "
                     f"(vlmsae - SAELens); wall time vlmsae / SAELens {ours['seconds'] / theirs['seconds']:.2f} "
                     "(goal <= 0.33)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2_000_000, help="training samples, per SAE")
    parser.add_argument("--width", type=int, default=4096, help="d_sae (the benchmark's recommended 4096)")
    parser.add_argument("--k", type=int, default=25, help="mean latents per sample (the benchmark's L0 25)")
    parser.add_argument("--seed", type=int, default=0, help="SAE init and sample stream")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-4, help="SAELens's learning rate (the benchmark's)")
    parser.add_argument("--vlmsae-lr", type=float, help="vlmsae's; default: its own, 2e-4 / sqrt(width / 2**14)")
    parser.add_argument("--chunk", type=int, default=32 * 1024, help="samples drawn at a time (memory)")
    parser.add_argument("--eval-samples", type=int, default=100 * 1024)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--saelens", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-saelens: train vlmsae's SAEs only (SAELens still builds, draws and scores)")
    parser.add_argument("--score-every", type=int, default=0,
                        help="samples between scores on the way (0: at the end only); each comes at the first chunk "
                        "boundary at or past a multiple of it, and --state is saved there")
    parser.add_argument("--json", type=Path, help="also write every score here, as it comes")
    parser.add_argument("--state", type=Path, help="keep the run's state here after every score, and resume from it "
                        "(vlmsae's side only: --no-saelens)")
    parser.add_argument("--model", default="16k", choices=["16k", "tiny"], help="tiny: a small model for smoke tests")
    parser.add_argument("--device", default="cpu", help="where the synthetic model, its samples and every SAE live; "
                        "other than cpu implies --in-process")
    parser.add_argument("--in-process", action="store_true", help="run SAELens's side in this process (sae_lens must "
                        "import beside vlmsae, as on the GPU machine with the carried wheels), not in the interop venv")
    parser.add_argument("--draw-batch", type=int, help="samples per draw of SAELens's generator (default: --batch; "
                        "on a GPU, 16384 or more: a draw of 1024 is launch-bound there)")
    parser.add_argument("--budget-s", type=float, default=0, help="stop after the chunk under way when this many "
                        "seconds of this sitting have passed, then score (0: no limit)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vlmsae" / "synth-sae-bench",
                        help="where the built synthetic model is kept")
    parser.add_argument("--interop-python", type=Path,
                        default=Path(os.environ.get("VLMSAE_INTEROP_PYTHON", REPO / ".venv-interop" / "bin" / "python")))
    args = parser.parse_args()
    args.in_process = args.in_process or args.device != "cpu"
    if not args.in_process and not args.interop_python.exists():
        sys.exit(f"no interop venv at {args.interop_python}: run tests/interop/setup_venv.sh or pass --interop-python")
    if args.state is not None and args.saelens:
        sys.exit("--state keeps vlmsae's trainers only: add --no-saelens")
    args.chunk -= args.chunk % args.batch
    args.samples -= args.samples % args.batch
    torch.set_num_threads(args.threads)

    peer = LocalPeer(args.device) if args.in_process else Peer(args.interop_python)
    try:
        peer("threads", n=args.threads)
        t0 = time.perf_counter()
        model = peer("build", model=args.model, cache=str(args.cache))
        print(f"synthetic model {args.model}: {'built' if model['built'] else 'loaded'} in "
              f"{time.perf_counter() - t0:.0f} s ({model['folder']})", file=sys.stderr)
        peer("setup", width=args.width, k=args.k, samples=args.samples, batch=args.batch, lr=args.lr, seed=args.seed,
             kinds=args.kinds if args.saelens else [], draw_batch=args.draw_batch)
        held_out = peer("eval_set", samples=args.eval_samples, seed=args.seed)
        print(f"\nSynthSAEBench-{args.model}: width {args.width}, k {args.k}, batch {args.batch}, lr {args.lr} (SAELens), "
              f"{args.vlmsae_lr or 'default'} (vlmsae), seed {args.seed}, {args.threads} threads; scored by SAELens on "
              f"{args.eval_samples:,} held-out samples (true L0 {held_out['true_l0']:.1f})\n", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            bench = Bench(args, peer, model["d_in"], Path(tmp))
            bench.load_state()
            rows = bench.run()
    finally:
        peer.close()

    print(table(rows, published=True))
    print()
    print("\n".join(verdicts(rows)))


if __name__ == "__main__":
    main()
