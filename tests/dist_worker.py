"""One rank of the distributed tests, launched by tests/test_distributed.py as
``torchrun --standalone --nproc_per_node 2 tests/dist_worker.py OUT``.

Writes what each rank ends with under OUT (``*.rank{r}.safetensors`` and ``.json``) for the test process
to compare with its single-process references. Not a test module itself (pytest does not collect it).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import vlmsae
from vlmsae import distributed
from vlmsae.checkpoints import latest_checkpoint
from vlmsae.trainer import SAETrainer

# Shared with the test: the SAEs, the global batches and how they are cut into rank shards.
D_IN, D_SAE, STEPS, SPLIT = 16, 64, 6, (40, 24)  # unequal shards: the global token count must matter
ONLINE = {"batch_size": 64, "buffer_size": 512, "sync_every": 8, "warmup_steps": 4, "k_start": 16, "progress": False}
ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu")
ONLINE_STEPS, ONLINE_EVERY, INTERRUPT_AT = 40, 8, 9
# float32 selection: bf16 scores (the default on a CPU with native bf16) tie often enough at BatchTopK's global
# threshold that N ranks keep the tied entries one process leaves out (SAETrainer._global_batchtopk)
PARITY_TRAINER = {"sync_every": 2, "compute_dtype": "float32"}


def parity_sae(architecture: str) -> vlmsae.SAE:
    torch.manual_seed(0)
    extra = {"topk": {"k": 4, "dead_tokens": 48}, "batchtopk": {"k": 4}}.get(architecture, {})  # topk: AuxK
    return vlmsae.SAE(d_in=D_IN, d_sae=D_SAE, architecture=architecture, **extra)


def parity_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(sum(SPLIT), D_IN, generator=g) * 3 + 1 for _ in range(STEPS)]


def shard(x: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(SPLIT[:rank])
    return x[start:start + SPLIT[rank]]


def online_data(model, n=12):
    from vlmsae.zoo import tiny_inputs

    return [tiny_inputs(model, 6, seed=s, padding="left" if s % 2 else "right") for s in range(n)]


def digest(sae) -> list[float]:
    return [float(p.double().sum()) for p in sae.state_dict().values()]


def run_parity(world, out: Path) -> None:
    """SAETrainer steps on this rank's shard of each global batch: the end state, and a digest after each step."""
    for architecture in ARCHITECTURES:
        sae = parity_sae(architecture)
        trainer = SAETrainer(sae, world=world, **PARITY_TRAINER)
        digests = []
        for x in parity_batches():
            trainer.step(shard(x, world.rank))
            digests.append(digest(sae))
        tag = f"parity-{architecture}.rank{world.rank}"
        save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, str(out / f"{tag}.safetensors"))
        history = [vars(m) for m in trainer.history]
        (out / f"{tag}.json").write_text(json.dumps({"digests": digests, "history": history}))


class Interrupt(Exception):
    pass


class Flaky:
    """The data, failing on rank 1 only after ``INTERRUPT_AT`` of its batches (mid-run, after a checkpoint)."""

    def __init__(self, data, rank):
        self.data, self.rank = data, rank

    def __iter__(self):
        for i, batch in enumerate(self.data * 100):
            if self.rank == 1 and i // 2 == INTERRUPT_AT:
                raise Interrupt
            yield batch


def run_online(world, out: Path) -> None:
    """vlmsae.train under 2 ranks: uninterrupted, interrupted on one rank, resumed; each rank's final SAE."""
    from vlmsae.zoo import tiny_model

    model = tiny_model("llava")
    data = online_data(model)
    cfg = dict(ONLINE, steps=ONLINE_STEPS, checkpoint_every=ONLINE_EVERY)

    def sae():
        torch.manual_seed(world.rank)  # different on each rank: the run starts every replica as rank 0's
        return vlmsae.SAE(d_in=64, d_sae=128, k=8)

    history = []
    ref = vlmsae.train(model, 1, data, sae(), out=out / "ref", history=history, **cfg).sae
    caught = None
    try:
        vlmsae.train(model, 1, Flaky(data, world.rank), sae(), out=out / "run", **cfg)
    except Exception as err:  # noqa: BLE001 - rank 1 raises Interrupt; rank 0 learns of it and stops on the same step
        caught = f"{type(err).__name__}: {err}"
    stopped = latest_checkpoint(out / "run")
    resumed_history = []
    resumed = vlmsae.train(model, 1, data, sae(), out=out / "run", resume=True, history=resumed_history, **cfg).sae
    write_error = None
    if world.rank == 1:  # rank 1 cannot stage its part of the step-8 checkpoint: a file where its folder goes
        (out / "fail" / "checkpoints").mkdir(parents=True)
        (out / "fail" / "checkpoints" / ".step-8.rank1").write_text("in the way")
    world.barrier()
    try:
        vlmsae.train(model, 1, data, sae(), out=out / "fail", **dict(cfg, steps=8))
    except OSError as err:  # every rank raises; none waits for the others
        write_error = f"{type(err).__name__}: {err}"
    tensors = {f"ref.{k}": v for k, v in ref.state_dict().items()}
    tensors |= {f"resumed.{k}": v for k, v in resumed.state_dict().items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"online.rank{world.rank}.safetensors"))
    (out / f"online.rank{world.rank}.json").write_text(json.dumps({
        "caught": caught, "stopped_at": str(stopped), "write_error": write_error, "history": history[-1], "resumed_history": resumed_history[-1]}))


# parallel="layers": 3 layers over 2 ranks (rank 0 owns 0 and 2, rank 1 owns 1). Each batch gives 144 rows (no
# padding, no outlier filter), so every fill ends on a round's last forward, as one process's fill ends.
LAYERS, LAYER_RUN = [0, 1, 2], {"batch_size": 96, "buffer_size": 1152, "sync_every": 6, "warmup_steps": 4,
                                "k_start": 16, "outlier_factor": None, "parallel": "layers", "progress": False}
LAYER_STEPS, LAYER_EVERY = 24, 6


def layer_data(model, n=12):
    from vlmsae.zoo import tiny_inputs

    return [tiny_inputs(model, 6, seed=s, padding=None) for s in range(n)]


def layer_saes(seed: int) -> dict:
    torch.manual_seed(seed)
    return {L: vlmsae.SAE(d_in=64, d_sae=128, k=8) for L in LAYERS}


def run_layers(world, out: Path) -> None:
    """vlmsae.train(parallel="layers") under 2 ranks: uninterrupted, interrupted on one rank, resumed."""
    from vlmsae.zoo import tiny_model

    model = tiny_model("llava")
    data = layer_data(model)
    cfg = dict(LAYER_RUN, steps=LAYER_STEPS, checkpoint_every=LAYER_EVERY)
    history = []
    ref = vlmsae.train(model, LAYERS, data, layer_saes(world.rank), out=out / "layers-ref", history=history, **cfg)
    caught = None
    try:
        vlmsae.train(model, LAYERS, Flaky(data, world.rank), layer_saes(world.rank), out=out / "layers-run", **cfg)
    except Exception as err:  # noqa: BLE001 - rank 1 raises Interrupt; rank 0 learns of it in the same round
        caught = f"{type(err).__name__}: {err}"
    stopped = latest_checkpoint(out / "layers-run")
    resumed = vlmsae.train(model, LAYERS, data, layer_saes(world.rank), out=out / "layers-run", resume=True, **cfg)
    tensors = {f"ref.L{L}.{k}": v for L in LAYERS for k, v in ref.saes[L][0].state_dict().items()}
    tensors |= {f"resumed.L{L}.{k}": v for L in LAYERS for k, v in resumed.saes[L][0].state_dict().items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"layers.rank{world.rank}.safetensors"))
    (out / f"layers.rank{world.rank}.json").write_text(json.dumps({
        "caught": caught, "stopped_at": str(stopped), "history": history, "resumed_history": resumed.history}))


def run_fsdp(world, out: Path) -> None:
    """A model whose layers FSDP2 shards over the 2 ranks (``fully_shard``): record with the early stop equals the
    whole model's hidden states and runs no deeper layer, and data-parallel training on it ends with the same SAE
    as on a plain replica."""
    from vlmsae.zoo import tiny_model

    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as err:
        (out / f"fsdp.rank{world.rank}.json").write_text(json.dumps({"skipped": f"no FSDP2 in this torch: {err}"}))
        return
    plain, sharded = tiny_model("llava"), tiny_model("llava")
    data = online_data(plain)
    inputs = data[world.rank]
    with torch.no_grad():
        hidden = plain(**inputs, output_hidden_states=True).hidden_states
    mesh = init_device_mesh("cpu", (world.size,))
    layers = vlmsae.layers(sharded).layers
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    try:
        with torch.no_grad():
            sharded(**inputs)  # FSDP2's first forward on CPU tensors
    except AttributeError as err:  # torch 2.6: FSDP2 asks the CPU for CUDA-only stream events
        (out / f"fsdp.rank{world.rank}.json").write_text(json.dumps(
            {"skipped": f"FSDP2 does not run on CPU under torch {torch.__version__} ({err})"}))
        return
    ran = []
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
    finished = []
    sharded.get_output_embeddings().register_forward_hook(lambda m, a, o: finished.append(True))  # the forward's end
    with torch.no_grad(), vlmsae.record(sharded, [1], stop=True) as rec:
        returned = sharded(**inputs)
    record_equal, ran_in_record = torch.equal(rec[1], hidden[2]), list(ran)
    cfg = dict(ONLINE, steps=16)

    def sae():
        torch.manual_seed(world.rank)
        return vlmsae.SAE(d_in=64, d_sae=128, k=8)

    ref = vlmsae.train(plain, 1, data, sae(), **cfg).sae
    got = vlmsae.train(sharded, 1, data, sae(), **cfg).sae
    (out / f"fsdp.rank{world.rank}.json").write_text(json.dumps({
        "record_equal": record_equal, "returned_none": returned is None, "ran": ran_in_record, "finished": finished,
        "ran_in_training": sorted(set(ran)),
        "train_equal": all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), got.state_dict().values())),
        "trained": float(ref.W_dec.double().sum())}))


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    world = distributed.init_from_env(timeout_s=120)
    out = Path(sys.argv[1])
    run_parity(world, out)
    run_online(world, out)
    run_layers(world, out)
    run_fsdp(world, out)
    world.barrier()
