"""The GPU figures in one prepared run (issue 17 item 4): four sections, each checked, then timed.

a) SAE training step, TopK with Adam, d_in 4096 / d_sae 65536 / k 64 / batch 16384: vlmsae's
   ``SAETrainer.step`` against EleutherAI sparsify and sae-lens (``peer_sae_step.py``'s steps, here in
   the same process) on the same activations, and the step's one dense matmul (the floor). Two regimes,
   all variants taking turns in every repeat:
   - no dead latents (the start of training): no side runs AuxK;
   - AuxK on: the same fixed eighth of the latents is dead on every side at every step. vlmsae runs
     its AuxK pass (aux_k = d_in / 2 dead latents, coefficient 1/32) over the latents a readout has
     seen dead (forced here: one readout before the timed steps); sae-lens runs its AuxK loss
     (k_aux = d_in / 2, coefficient 1.0, its default) whenever its trainer's mask has a dead latent;
     sparsify runs its AuxK loss (k_aux = d_in / 2) only when its trainer has ``auxk_alpha > 0``
     (its default is 0; 1/32 here). Both
     peers count the dead latents on the host at every step (one sync each).
   The peers' steps include their trainers' per-step firing counters; sae-lens runs under bf16
   autocast (its ``autocast=True``), sparsify under the bf16 autocast of its own forward.
b) Hooks and interventions on LLaVA-1.5-7B's shapes (Llama-2-7B decoder, CLIP ViT-L/14-336, 576 image
   tokens), random bf16 weights built directly on the device: forward time of record (middle layer,
   every layer), record with early stop, splice and steer as ratios to the plain forward; generate()
   with record, splice and steer as ratios to plain generate().
c) Online training on that model: ``vlmsae.train`` at the middle layer (d_sae 65536, k 64), with its SAE
   steps on their own stream (the default) and without (``overlap=False``), against harvest alone (record with early stop into ring buffers, over the same batches, as many rows as
   training read), in tokens/s, and their ratio (design goal >= 0.85); also that ratio per row
   harvested, since training harvests its first full buffer before it trains.
d) The data-parallel SAE step on the GPU (``bench_distributed.py --one-gpu``): one machine has one GPU,
   and NCCL refuses two ranks on one device, so 2 ranks share it over gloo against 1 process on it, at
   d_in 1024 / d_sae 16384 / k 32 / batch 8192: the ranks must end with identical SAEs (a check), and the
   ratio is the cost of the gradient all-reduce staged through the host, not a scaling figure (that
   needs one GPU per rank: ``--nproc 8`` on an 8-GPU node).

Every section checks its results cheaply first (prints a ``check`` line), reports
``torch.cuda.max_memory_allocated``, and runs inside try/except: one failing section leaves the
others' figures. A missing peer is reported and skipped. The JSON (``--out``) is rewritten after
every section; the markdown table is printed last.

On the lent H200, from the repo root, with the wheels the image lacks in .whl (plotly for vlmsae;
eai-sparsify, sae-lens, transformer-lens 3.x and their import-time needs for the peers; .whl is
git-ignored, so the device call names it in ``carry``). ``bash benchmarks/gpu_wheels.sh`` fills .whl here, on a
machine that reaches the package index (pinned versions, about 35 MiB). About 3-4 minutes there; give it 600 s:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_figures.py --out $OUT/gpu.json

``benchmarks/gpu_session.sh`` runs this, then the GPU scaling curves and the long SynthSAEBench run, in one call.

CPU smoke test (toy sizes, every section end to end):

    python benchmarks/gpu_figures.py --tiny --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.machinery
import json
import math
import platform
import subprocess
import sys
import time
import traceback
import types
from datetime import datetime, timezone
from pathlib import Path

import torch

import vlmsae
from common import harvest_rate, llava_7b, llava_inputs, median_times, timer
from vlmsae.sae import SAE
from vlmsae.trainer import SAETrainer

# Sparse-step ceiling at d=4096, n=65536, k=64 on an H200 (../shared/DESIGN.md, "Performance model").
H200_CEILING_TOKENS_PER_S = 1.3e6
START = time.perf_counter()


def say(*parts) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s]", *parts, flush=True)


class Report:
    """Figures by section, written to JSON after every section; rows for the final markdown table."""

    def __init__(self, path: Path | None, meta: dict):
        self.path, self.data, self.rows = path, {"meta": meta}, []

    def row(self, section: str, figure: str, value: str) -> None:
        self.rows.append((section, figure, value))

    def save_partial(self, name: str, result: dict) -> None:
        """Keep a section's figures so far, in case it dies later (a timeout kills without a traceback)."""
        self.data[name] = result
        self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def table(self) -> str:
        lines = ["| section | figure | value |", "|---|---|---:|"]
        lines += [f"| {s} | {f} | {v} |" for s, f, v in self.rows]
        return "\n".join(lines)


def check(results: dict, name: str, ok: bool, detail: str = "") -> None:
    results[name] = {"ok": bool(ok), "detail": detail}
    say(f"check {'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""))


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def reset_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> float | None:
    return gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


# --- a) SAE training step --------------------------------------------------------------------------


def import_peer(name: str):
    """The peer's step factory from peer_sae_step.py, after checking that its package imports."""
    import peer_sae_step

    if name == "sae-lens":
        try:
            import sae_lens
        except ModuleNotFoundError as err:
            if err.name != "wandb":
                raise
            # sae-lens imports wandb at import time and never calls it in a training step; the image
            # has no wandb (its wheel and needs are over 25 MB), so an empty module stands in while
            # sae-lens imports, and leaves sys.modules after (find_spec("wandb") must not see it).
            say("sae-lens: wandb is not installed; an empty stand-in module satisfies its import")
            stub = types.ModuleType("wandb")
            stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
            for key in [k for k in sys.modules if k == "sae_lens" or k.startswith("sae_lens.")]:
                del sys.modules[key]  # the half-imported package
            sys.modules["wandb"] = stub
            try:
                import sae_lens
            finally:
                del sys.modules["wandb"]
        return peer_sae_step.saelens_step, f"sae-lens {sae_lens.__version__}"
    import sparsify
    return peer_sae_step.sparsify_step, f"eai-sparsify {sparsify.__version__}"


def failure(where: str, failed: dict) -> None:
    """Print the exception being handled and keep its traceback under ``failed[where]``."""
    say(f"{where}: FAILED (traceback below); the section goes on without it")
    traceback.print_exc()
    sys.stderr.flush()
    failed[where] = traceback.format_exc(limit=8)


def section_sae_step(args, device, now, report: Report) -> dict:
    out = {"config": {"d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "batch": args.batch,
                      "dead_fraction_auxk": args.dead_fraction, "repeats": args.sae_repeats}, "checks": {}}
    failed = out["failed"] = {}
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in, device=device)
    dead = torch.zeros(args.d_sae, dtype=torch.bool, device=device)
    dead[torch.randperm(args.d_sae, device=device)[:int(args.d_sae * args.dead_fraction)]] = True
    variants, trainers = {}, {}

    def add(name: str, build) -> None:
        try:
            variants[name] = build()
        except Exception:
            failure(f"building {name}", failed)

    def vlmsae_step(name: str, auxk: bool):
        sae = SAE(d_in=args.d_in, d_sae=args.d_sae, k=args.k, device=device)
        trainer = trainers[name] = SAETrainer(sae, sync_every=10**9)  # no readout inside the timed steps
        if not auxk:
            return lambda: trainer.step(x)
        if not hasattr(trainer, "tokens_since_fired"):
            raise RuntimeError("SAETrainer has no tokens_since_fired: cannot force AuxK")
        trainer.tokens_since_fired.masked_fill_(dead, sae.cfg.dead_tokens)
        trainer.read_metrics()  # a readout sees them: AuxK runs over them from now on

        def step():
            # the fixed dead set, as on the peers' side (a latent that fired in the main TopK dies again)
            trainer.tokens_since_fired.masked_fill_(dead, sae.cfg.dead_tokens)
            trainer.step(x)
        return step

    def floor_matmul():
        # the step's one dense matmul, in the trainer's compute dtype (bf16 on CUDA)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        x_floor = x.to(dtype)
        W_floor = torch.randn(args.d_in, args.d_sae, device=device, dtype=dtype)
        return lambda: x_floor @ W_floor

    add("vlmsae", lambda: vlmsae_step("vlmsae", False))
    add("vlmsae +AuxK", lambda: vlmsae_step("vlmsae +AuxK", True))
    add("dense floor (x @ W_enc)", floor_matmul)
    peers = out["peers"] = {}
    for name in ("sparsify", "sae-lens"):
        try:
            factory, peers[name] = import_peer(name)
        except Exception:
            failure(f"importing {name}", failed)
            continue
        add(name, lambda: factory(x, args.d_sae, args.k, bookkeeping=True))
        add(f"{name} +AuxK", lambda: factory(x, args.d_sae, args.k, dead=dead, bookkeeping=True))
        say(f"peer {peers[name]}: built")

    # warm-up and checks: two steps each, then what each step reports; a variant that fails is dropped
    for name, fn in list(variants.items()):
        try:
            result = [fn(), fn()][-1]
            if name in trainers:
                m = trainers[name].read_metrics()
                ok = math.isfinite(m.fvu) and 0 < m.l0 <= args.k + 0.5 and (m.aux_loss > 0 if "AuxK" in name else True)
                check(out["checks"], f"{name} step", ok, f"fvu {m.fvu:.3f}, l0 {m.l0:.2f} (k {args.k}), aux loss "
                      f"{m.aux_loss:.3g}" + (" (> 0: AuxK ran)" if "AuxK" in name else ""))
            elif name.removesuffix(" +AuxK") in peers:
                loss, aux = (float(t) for t in result)
                ok = math.isfinite(loss) and (aux > 0 if "AuxK" in name else True)
                check(out["checks"], f"{name} step", ok, f"loss {loss:.4g}, aux loss {aux:.3g}")
        except Exception:
            failure(f"first steps of {name}", failed)
            del variants[name]

    say(f"timing {len(variants)} variants x {args.sae_repeats} interleaved steps")
    median = median_times(variants, args.sae_repeats, now)
    rows = out["variants"] = {}
    for name, seconds in median.items():
        base = median.get("vlmsae +AuxK" if name.endswith("+AuxK") else "vlmsae")
        rows[name] = {"s_per_step": seconds, "tokens_per_s": args.batch / seconds,
                      "time_over_vlmsae": seconds / base if base else None}
        say(f"  {name:26} {1e3 * seconds:9.2f} ms/step {args.batch / seconds:12,.0f} tokens/s"
            + (f" {seconds / base:7.2f}x vlmsae's time" if base else ""))
    ours, floor = median.get("vlmsae"), median.get("dense floor (x @ W_enc)")
    for name, seconds in median.items():
        report.row("a", f"{name}: tokens/s (ms/step)", f"{args.batch / seconds:,.0f} ({1e3 * seconds:.1f})")
    if ours and floor:
        out["vlmsae_over_floor"] = floor / ours
        report.row("a", "vlmsae tokens/s / dense floor's", f"{floor / ours:.2f}")
    if ours and device.type == "cuda":
        out["vlmsae_over_h200_ceiling"] = args.batch / ours / H200_CEILING_TOKENS_PER_S
        report.row("a", f"vlmsae / H200 sparse ceiling ({H200_CEILING_TOKENS_PER_S:.1e} tokens/s)",
                   f"{out['vlmsae_over_h200_ceiling']:.2f}")
    for name, row in rows.items():
        if name.removesuffix(" +AuxK") in peers and row["time_over_vlmsae"]:
            report.row("a", f"vlmsae speed-up over {name}", f"{row['time_over_vlmsae']:.2f}x")
    for name in failed:
        report.row("a", name, "FAILED: see the log")
    return out


# --- b) hooks and interventions on the 7B-shaped LLaVA --------------------------------------------

_MODEL: dict = {}


def get_model(args, device):
    """The LLaVA (7B shapes, or tiny with --tiny) in bf16, built once and shared by sections b and c."""
    if "model" not in _MODEL:
        t0 = time.perf_counter()
        model, inputs = llava_7b(torch.bfloat16, device, batch=args.images, text=args.text, tiny=args.tiny)
        n = sum(p.numel() for p in model.parameters())
        _MODEL.update(model=model, inputs=inputs, params=n, build_s=time.perf_counter() - t0)
        say(f"model built: {n / 1e9:.2f}B parameters in bf16 on {device} in {_MODEL['build_s']:.1f}s; inputs "
            f"{tuple(inputs['input_ids'].shape)}")
    return _MODEL["model"], _MODEL["inputs"]


def section_hooks(args, device, now, report: Report) -> dict:
    model, inputs = get_model(args, device)
    info = vlmsae.layers(model)
    mid, n = info.n_layers // 2, info.n_layers
    out = {"model": {"params": _MODEL["params"], "build_s": _MODEL["build_s"], "layers": n, "d_model": info.d_model,
                     "batch": tuple(inputs["input_ids"].shape), "layer": mid},
           "sae": {"d_sae": args.d_sae, "k": args.k, "dtype": "bfloat16"}, "checks": {}}
    sae = vlmsae.SAE(d_in=info.d_model, d_sae=args.d_sae, k=args.k, device=device, dtype="bfloat16").eval()
    features = {0: 4.0, 1: -2.0}
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    contexts = {
        "plain": lambda: torch.no_grad(),
        f"record L{mid}": lambda: vlmsae.record(model, [mid]),
        f"record all {n}": lambda: vlmsae.record(model, range(n)),
        f"record L{mid}, early stop": lambda: vlmsae.record(model, [mid], stop=True),
        "splice": lambda: vlmsae.splice(model, mid, sae),
        "steer": lambda: vlmsae.steer(model, mid, sae, features),
    }
    failed = out["failed"] = {}
    generate_ok = {"plain", f"record L{mid}", "splice", "steer"}
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True)
        truth, captured = plain.hidden_states[mid + 1], None
        try:
            with vlmsae.record(model, [mid]) as rec:
                model(**inputs)
            captured = rec[mid]
            diff = (captured.float() - truth.float()).abs().max().item()
            check(out["checks"], f"record L{mid} == output_hidden_states[{mid + 1}]",
                  torch.equal(captured, truth) or diff <= 1e-2 * truth.float().abs().max().item(),
                  "bitwise equal" if torch.equal(captured, truth) else f"max |diff| {diff:.3g}")
            with vlmsae.record(model, range(n)) as rec_all:
                model(**inputs)
            check(out["checks"], f"record all {n} == output_hidden_states[1:{n}]",
                  all(torch.equal(rec_all[L], plain.hidden_states[L + 1]) for L in range(n - 1)))
            del rec_all
        except Exception:
            failure("record", failed)
            contexts.pop(f"record L{mid}"), contexts.pop(f"record all {n}")
        try:
            with vlmsae.record(model, [mid], stop=True) as early:
                returned = model(**inputs)
            check(out["checks"], "early stop: forward returns None, capture equals output_hidden_states",
                  returned is None and torch.equal(early[mid], truth))
        except Exception:
            failure("early stop", failed)
            contexts.pop(f"record L{mid}, early stop")
        try:
            with vlmsae.splice(model, mid, sae):
                spliced = model(**inputs).logits
            check(out["checks"], "splice: logits finite", bool(torch.isfinite(spliced).all()),
                  f"max |logit - plain| {(spliced.float() - plain.logits.float()).abs().max().item():.3g}")
            del spliced
        except Exception:
            failure("splice", failed)
            contexts.pop("splice")
        try:
            with vlmsae.steer(model, mid, sae, features):
                steered = model(**inputs).logits
            check(out["checks"], "steer: logits finite and moved", bool(torch.isfinite(steered).all())
                  and not torch.equal(steered, plain.logits))
            del steered
        except Exception:
            failure("steer", failed)
            contexts.pop("steer")
        try:
            with vlmsae.steer(model, mid, sae, features):
                seq = model.generate(**inputs, **gen)
            want = inputs["input_ids"].shape[1] + args.new_tokens
            check(out["checks"], "steer under generate: every new token", seq.shape[1] == want,
                  f"{tuple(seq.shape)}, want length {want}")
        except Exception:
            failure("steer under generate", failed)
            generate_ok.discard("steer")
        del plain, truth, captured

    def run(ctx, fn):
        def go():
            with torch.no_grad(), ctx():
                fn()
        return go

    say(f"timing {len(contexts)} forward variants x {args.repeats} interleaved repeats")
    fwd = median_times({k: run(c, lambda: model(**inputs)) for k, c in contexts.items()}, args.repeats, now)
    out["forward_ms"] = 1e3 * fwd["plain"]
    out["forward_ratios"] = {k: v / fwd["plain"] for k, v in fwd.items()}
    out["forward_tokens_per_s"] = inputs["input_ids"].numel() / fwd["plain"]
    for k, v in out["forward_ratios"].items():
        say(f"  forward  {k:28} {1e3 * fwd[k]:9.1f} ms  {v:6.3f}x plain")
    report.row("b", f"plain forward, {tuple(inputs['input_ids'].shape)} tokens",
               f"{out['forward_ms']:.1f} ms ({out['forward_tokens_per_s']:,.0f} tokens/s)")
    for k, v in out["forward_ratios"].items():
        if k != "plain":
            report.row("b", f"{k} / plain forward", f"{v:.3f}")
    report.save_partial("hooks", out)

    gen_contexts = {k: c for k, c in contexts.items() if k in generate_ok}
    gen_repeats = max(3, args.repeats // 2)
    say(f"timing {len(gen_contexts)} generate variants ({args.new_tokens} new tokens) x {gen_repeats} repeats")
    try:
        gen_t = median_times({k: run(c, lambda: model.generate(**inputs, **gen)) for k, c in gen_contexts.items()},
                             gen_repeats, now)
        out["generate_ms"] = 1e3 * gen_t["plain"]
        out["generate_ratios"] = {k: v / gen_t["plain"] for k, v in gen_t.items()}
        for k, v in out["generate_ratios"].items():
            say(f"  generate {k:28} {1e3 * gen_t[k]:9.1f} ms  {v:6.3f}x plain")
        report.row("b", f"plain generate, {args.new_tokens} new tokens", f"{out['generate_ms']:.1f} ms")
        for k, v in out["generate_ratios"].items():
            if k != "plain":
                report.row("b", f"{k} under generate / plain generate", f"{v:.3f}")
    except Exception:
        failure("generate timing", failed)
    for name in failed:
        report.row("b", name, "FAILED: see the log")
    return out


# --- c) online training vs harvest alone -----------------------------------------------------------


def section_distributed(args, device, now, report: Report) -> dict:
    size = ["--d-in", "64", "--d-sae", "512", "--k", "8", "--batch", "256"] if args.tiny else \
        ["--d-in", "1024", "--d-sae", "16384", "--k", "32", "--batch", "8192"]
    where = ["--device", "cuda", "--one-gpu"] if device.type == "cuda" else ["--device", "cpu"]
    cmd = [sys.executable, str(Path(__file__).with_name("bench_distributed.py")), *where, *size,
           "--nproc", "2", "--rounds", "1", "--steps", "5"]
    say(" ".join(cmd[1:]))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = {"command": " ".join(cmd[1:]), "stdout": done.stdout, "checks": {}}
    check(out["checks"], "bench_distributed ran; replicas identical", done.returncode == 0,
          (done.stdout + done.stderr)[-300:] if done.returncode else "")
    for line in done.stdout.splitlines():
        say("  " + line)
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3 and cells[0] not in ("variant",):
            report.row("d", f"{cells[0]}: s/step, tokens/s", f"{cells[1]}, {cells[2]}")
        elif line.startswith("ratio"):
            report.row("d", line.split(":")[0], line.split(":")[1].strip())
    return out


def section_train(args, device, now, report: Report) -> dict:
    model, _ = get_model(args, device)
    info = vlmsae.layers(model)
    layer = info.n_layers // 2
    batches = [llava_inputs(model.config, args.images, args.text, torch.bfloat16, device, seed=s) for s in range(4)]
    buffer_size = 8 * args.train_batch
    out = {"layer": layer, "d_sae": args.d_sae, "k": args.k, "sae_batch": args.train_batch,
           "buffer_size": buffer_size, "steps": args.train_steps, "checks": {}}

    def sae():
        return vlmsae.SAE(d_in=info.d_model, d_sae=args.d_sae, k=args.k, device=device)

    def train(steps, history=None, overlap=True):
        extra = {} if history is None else {"history": history}
        return vlmsae.train(model, layer, batches, sae(), steps=steps, batch_size=args.train_batch,
                            buffer_size=buffer_size, sync_every=args.sync_every, progress=False, overlap=overlap,
                            **extra)

    failed = out["failed"] = {}
    trained_tokens = args.train_steps * args.train_batch
    train_rate = harvest = None
    try:
        say("online training: warm-up (4 steps)")
        train(4)
        say(f"online training: {args.train_steps} steps of {args.train_batch} tokens")
        history = []
        t0 = now()
        trained = train(args.train_steps, history)
        train_s = now() - t0
        train_rate = trained_tokens / train_s
        out.update(train_s=train_s, train_tokens_per_s=train_rate, history=history)
        say(f"  harvest + train {train_rate:,.0f} tokens/s")
        report.row("c", f"harvest + train ({args.train_steps} steps x {args.train_batch}), tokens/s",
                   f"{train_rate:,.0f}")
        report.save_partial("online_train", out)
        last = history[-1] if history else {}
        finite = all(bool(torch.isfinite(p).all()) for p in trained.sae.parameters())
        check(out["checks"], "trained SAE finite, 0 < l0 <= k", finite and math.isfinite(last.get("fvu", math.nan))
              and 0 < last.get("l0", 0) <= args.k + 0.5, f"last readout: step {last.get('step')}, "
              f"fvu {last.get('fvu', math.nan):.3f}, l0 {last.get('l0', math.nan):.2f}")
        del trained
        reset_memory(device)  # the blocks cached for the side stream, back to the driver
        say("online training, the steps on the forwards' stream (overlap=False)")
        t0 = now()
        train(args.train_steps, overlap=False)
        plain_rate = trained_tokens / (now() - t0)
        out.update(plain_tokens_per_s=plain_rate, overlap_gain=train_rate / plain_rate)
        say(f"  harvest + train without overlap {plain_rate:,.0f} tokens/s; overlap gain {train_rate / plain_rate:.2f}x")
        report.row("c", "same, overlap=False (steps on the forwards' stream), tokens/s", f"{plain_rate:,.0f}")
        report.row("c", "overlap gain (overlap=True / overlap=False)", f"{train_rate / plain_rate:.2f}")
    except Exception:
        failure("online training", failed)
    reset_memory(device)
    try:
        say(f"harvest alone: until {trained_tokens:,} rows kept")
        # buffers of half the size: training refills half its buffer at a time, and drops the same overflow
        harvest, forwards = harvest_rate(model, layer, batches, trained_tokens, buffer_size // 2, now)
        check(out["checks"], "harvest kept rows", harvest > 0, f"{forwards} forwards")
        out.update(harvest_tokens_per_s=harvest, harvest_forwards=forwards)
        say(f"  harvest alone {harvest:,.0f} tokens/s")
        report.row("c", f"harvest alone (record L{layer}, early stop), tokens/s", f"{harvest:,.0f}")
    except Exception:
        failure("harvest alone", failed)
    if train_rate and harvest:
        # training harvests the whole buffer first, then half a buffer per read phase: rows it harvested
        per_phase = buffer_size // 2 // args.train_batch
        harvested = buffer_size + (math.ceil(args.train_steps / per_phase) - 1) * (buffer_size // 2)
        out.update(ratio=train_rate / harvest, rows_harvested_by_train=harvested,
                   ratio_per_harvested_row=train_rate / harvest * harvested / trained_tokens)
        say(f"  ratio harvest+train / harvest {out['ratio']:.3f} (goal >= 0.85)")
        report.row("c", "ratio harvest+train / harvest (goal >= 0.85)", f"{out['ratio']:.3f}")
        report.row("c", f"same, per row harvested ({harvested:,} for {trained_tokens:,} trained)",
                   f"{out['ratio_per_harvested_row']:.3f}")
    for name in failed:
        report.row("c", name, "FAILED: see the log")
    return out


# --- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON file for the figures (rewritten after each section)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", nargs="+", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d"])
    parser.add_argument("--tiny", action="store_true", help="toy sizes for a CPU smoke test of every section")
    parser.add_argument("--d-in", type=int, default=4096)
    parser.add_argument("--d-sae", type=int, default=65536)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16384, help="tokens per SAE step in section a")
    parser.add_argument("--sae-repeats", type=int, default=15)
    parser.add_argument("--dead-fraction", type=float, default=0.125)
    parser.add_argument("--images", type=int, default=8, help="images (samples) per forward in b and c")
    parser.add_argument("--text", type=int, default=123, help="text tokens per sample (after BOS + 576 image)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--train-steps", type=int, default=96)
    parser.add_argument("--train-batch", type=int, default=16384)
    parser.add_argument("--sync-every", type=int, default=25, help="training's metric readouts (its default: 25)")
    parser.add_argument("--budget-s", type=float, default=360, help="start no section after this many seconds")
    args = parser.parse_args()
    if args.tiny:
        args.d_in, args.d_sae, args.k, args.batch, args.sae_repeats = 64, 1024, 8, 256, 3
        args.images, args.text, args.new_tokens, args.repeats = 2, 12, 3, 2
        args.train_steps, args.train_batch, args.sync_every = 8, 64, 4
    device = torch.device(args.device)
    now = timer(device)
    import transformers
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else f"CPU ({platform.machine()})"),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tiny": args.tiny, "args": vars(args)}
    report = Report(args.out, meta)
    say(f"gpu_figures: {meta['device_name']}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"sections {' '.join(args.sections)}{' (tiny)' if args.tiny else ''}")
    sections = {"a": ("sae_step", section_sae_step), "b": ("hooks", section_hooks),
                "c": ("online_train", section_train), "d": ("distributed", section_distributed)}
    for key in args.sections:
        name, fn = sections[key]
        if time.perf_counter() - START > args.budget_s:
            say(f"=== {key}) {name}: SKIPPED, past the {args.budget_s:.0f} s budget")
            report.row(key, "SKIPPED", f"past the {args.budget_s:.0f} s budget")
            continue
        say(f"=== {key}) {name}")
        reset_memory(device)
        t0 = time.perf_counter()
        try:
            result = fn(args, device, now, report)
        except Exception as err:
            traceback.print_exc()
            sys.stderr.flush()
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            report.row(key, "FAILED", f"{type(err).__name__}: {str(err)[:120]}".replace("|", "/").replace("\n", " "))
        result["wall_s"] = time.perf_counter() - t0
        result["max_memory_allocated_gib"] = peak_memory(device)
        report.row(key, "section wall time / max memory allocated",
                   f"{result['wall_s']:.0f} s / " + (f"{result['max_memory_allocated_gib']} GiB"
                                                      if device.type == "cuda" else "n/a (CPU)"))
        report.data[name] = result
        report.save()
        say(f"=== {key}) {name} done in {result['wall_s']:.1f}s")
        if key == "a":  # the SAEs and their optimisers go before the model comes
            reset_memory(device)
    report.data["total_s"] = time.perf_counter() - START
    report.save()
    print(f"\n## GPU figures: {meta['device_name']}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {meta['date']}, total {report.data['total_s']:.0f} s\n", flush=True)
    print(report.table(), flush=True)


if __name__ == "__main__":
    main()
