"""An SAE with its latents sharded over 2 gloo ranks (vlmsae.sharded_sae) equals the unsharded SAE (issue 13, item 5).

The parent builds every SAE and input and computes the references with the plain `vlmsae.SAE`; two spawned
processes (gloo on a free local port, 60 s collective timeout, a join deadline) shard the same SAEs and write
what each rank computes. A rank's latents are its (..., d_sae / 2) slice: the two slices side by side must be
the unsharded latents. Scores are random floats (no ties) except in the tie test, whose integer weights make
exact ties on purpose; there the reference is the documented rule (lowest global index wins), computed with a
stable sort.
"""

import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlmsae import SAE, SAEConfig, SAETrainer
from vlmsae.errors import ConfigError
from vlmsae.sharded_sae import ShardedSAE, select_global, shard_bounds, topk_lowest_index
from vlmsae.sharded_trainer import ShardedTrainer

WORLD = 2
D_IN, D_SAE, K = 8, 32, 4
TRAIN_STEPS = 3
CASES = [("topk", True), ("batchtopk", True), ("batchtopk", False), ("relu", True), ("jumprelu", True)]


def random_sae(architecture: str, seed: int) -> SAE:
    """An SAE whose every tensor is random (biases and thresholds too), act_scale 2: every term of the math counts."""
    torch.manual_seed(seed)
    sae = SAE(d_in=D_IN, d_sae=D_SAE, k=K, architecture=architecture)
    with torch.no_grad():
        for name, value in sae.state_dict().items():
            if name == "act_scale":
                value.fill_(2.0)
            elif name == "threshold":
                value.copy_(torch.rand_like(value) * 0.5)
            else:
                value.copy_(torch.randn_like(value) * (0.3 if name.startswith("b_") else 1.0))
    return sae


def tied_sae(architecture: str) -> tuple[SAE, torch.Tensor]:
    """An SAE with integer weights and inputs: pre-activations are exact small integers, full of ties across
    and within ranks."""
    sae = SAE(d_in=D_IN, d_sae=D_SAE, k=K, architecture=architecture, apply_b_dec_to_input=False)
    torch.manual_seed(10)  # a seed whose scores tie at the cut: the k-th and (k+1)-th largest are equal
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-1, 2, sae.W_enc.shape).float())
        sae.b_enc.zero_()
        sae.W_enc[:, 16:] = sae.W_enc[:, :16]  # rank 1's latents repeat rank 0's: every score ties across ranks
    return sae, torch.randint(-2, 3, (6, D_IN)).float()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, inputs: dict, out: str) -> None:
    """One rank: shard every case's SAE, run it, gather it back; write what it computed to ``out.<rank>``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for name, (sae, batches) in inputs["train"].items():
            sharded = ShardedSAE.from_sae(sae)
            trainer = ShardedTrainer(sharded)
            losses = torch.stack([trainer.step(x) for x in batches])
            results[f"train-{name}"] = {"losses": losses, "gathered": sharded.gather(dst=0)}
        for name, (sae, x) in inputs["run"].items():
            sharded = ShardedSAE.from_sae(sae)
            with torch.no_grad():
                out_ = sharded(x)
                results[name] = {"latents": out_.latents, "pre": out_.pre_acts, "recon": out_.recon,
                                 "encode": sharded.encode(x), "decode": sharded.decode(out_.latents),
                                 "bounds": (sharded.lo, sharded.hi)}
            results[name]["gathered"] = sharded.gather(dst=1)
            if name == "topk":  # gradients of the reconstruction loss, through both collectives
                sharded.zero_grad()
                x_n = x * sharded.act_scale
                (sharded(x).recon * sharded.act_scale - x_n).pow(2).mean().backward()
                results[name]["grads"] = {n: p.grad for n, p in sharded.named_parameters()}
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def run_ranks(inputs: dict, tmp_path) -> list[dict]:
    """Spawn WORLD ranks of `worker`; fail (and end them) if they do not finish in 240 s."""
    ctx = mp.start_processes(worker, args=(free_port(), inputs, str(tmp_path / "rank")), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail("the sharded ranks did not finish in 240 s (a collective hung)")
    return [torch.load(tmp_path / f"rank.{rank}", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What both ranks computed, and the inputs: one spawn for the whole file."""
    inputs = {}
    for seed, (architecture, training) in enumerate(CASES):
        sae = random_sae(architecture, seed).train(training)
        torch.manual_seed(100 + seed)
        inputs[f"{architecture}{'' if training else '-eval'}"] = (sae, torch.randn(3, 5, D_IN))
    inputs["tied-topk"], inputs["tied-batchtopk"] = tied_sae("topk"), tied_sae("batchtopk")
    train = {}
    for seed, architecture in enumerate(("topk", "batchtopk")):
        torch.manual_seed(200 + seed)
        sae = SAE(d_in=D_IN, d_sae=D_SAE, k=K, architecture=architecture)  # SAE's own init; b_dec from batch 1
        train[architecture] = (sae, [torch.randn(32, D_IN) * 3 + 1 for _ in range(TRAIN_STEPS)])
    results = run_ranks({"run": inputs, "train": train}, tmp_path_factory.mktemp("sharded"))
    return inputs, results, train


def joined(results: list[dict], case: str, key: str) -> torch.Tensor:
    return torch.cat([r[case][key] for r in results], dim=-1)


@pytest.mark.parametrize("case", ["topk", "batchtopk", "batchtopk-eval", "relu", "jumprelu"])
def test_sharded_sae_equals_the_unsharded_sae(ranks, case):
    """forward / encode / decode on 2 ranks: the slices side by side are the SAE's latents and pre-activations;
    every rank's reconstruction is the SAE's."""
    inputs, results, _ = ranks
    sae, x = inputs[case]
    with torch.no_grad():
        ref = sae(x)
    assert [r[case]["bounds"] for r in results] == [(0, 16), (16, 32)]
    torch.testing.assert_close(joined(results, case, "pre"), ref.pre_acts, rtol=0, atol=1e-5)
    latents = joined(results, case, "latents")
    assert torch.equal(latents != 0, ref.latents != 0), "the sharded SAE kept other latents"
    torch.testing.assert_close(latents, ref.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(joined(results, case, "encode"), ref.latents, rtol=0, atol=1e-5)
    for r in results:
        torch.testing.assert_close(r[case]["recon"], ref.recon, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(r[case]["decode"], ref.recon, rtol=1e-6, atol=1e-5)
    if case in ("topk", "batchtopk"):  # the sparsity the architecture promises, over both ranks
        assert (latents != 0).sum() <= K * x[..., 0].numel()


def test_gather_rebuilds_the_full_sae_on_one_rank(ranks):
    inputs, results, _ = ranks
    for case, (sae, _) in inputs.items():
        assert results[0][case]["gathered"] is None
        full = results[1][case]["gathered"]
        assert full.cfg == sae.cfg and full.training == sae.training
        assert full.state_dict().keys() == sae.state_dict().keys()
        for name, value in sae.state_dict().items():
            assert torch.equal(full.state_dict()[name], value), (case, name)


def test_gradients_equal_the_unsharded_sae(ranks):
    """Backward through the encoder's f and the decoder's g: local slices get the SAE's gradient slices, and the
    replicated b_dec the SAE's whole gradient on every rank."""
    inputs, results, _ = ranks
    sae, x = inputs["topk"]
    sae = sae.train()
    sae.zero_grad()
    x_n = x * sae.act_scale
    (sae(x).recon * sae.act_scale - x_n).pow(2).mean().backward()
    for name in ("W_enc", "b_enc", "W_dec"):
        dim = 1 if name == "W_enc" else 0
        torch.testing.assert_close(torch.cat([r["topk"]["grads"][name] for r in results], dim=dim),
                                   getattr(sae, name).grad, rtol=0, atol=1e-5)
    for r in results:
        torch.testing.assert_close(r["topk"]["grads"]["b_dec"], sae.b_dec.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_ties_go_to_the_lowest_global_index(ranks, architecture):
    """Integer scores that tie within and across ranks: both ranks together keep the k largest per token (topk)
    or the k * n_tokens largest of the batch (batchtopk), the lowest global index first among equals (rank 0's
    copy of a tied latent before rank 1's; for batchtopk an earlier token first)."""
    inputs, results, _ = ranks
    sae, x = inputs[f"tied-{architecture}"]
    pre = x @ sae.W_enc
    scores = pre if architecture == "topk" else pre.reshape(1, -1)
    keep = K if architecture == "topk" else K * x.shape[0]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :keep]  # stable: lowest index first
    expected = torch.zeros_like(scores).scatter(-1, order, scores.gather(-1, order)).relu().reshape(pre.shape)
    ranked = scores.sort(dim=-1, descending=True).values
    assert (ranked[:, keep - 1] == ranked[:, keep]).any(), "the test needs a tie at the cut"
    assert torch.equal(joined(results, f"tied-{architecture}", "latents"), expected)


def test_topk_lowest_index_keeps_the_lowest_of_equal_scores():
    scores = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5.0, 4.0, 4.0, 4.0, -1.0]])
    assert topk_lowest_index(scores, 2).sort(dim=-1).values.tolist() == [[0, 2], [0, 1], [0, 1]]
    torch.manual_seed(0)
    untied = torch.randn(50, 40)
    assert torch.equal(topk_lowest_index(untied, 7).sort(-1).values, untied.topk(7).indices.sort(-1).values)


def test_one_process_is_a_world_of_one():
    """Without a process group: one slice holding every latent, equal to the SAE; select_global is a plain top-k."""
    assert not dist.is_initialized()
    sae = random_sae("topk", 3).eval()
    x = torch.randn(4, D_IN)
    sharded = ShardedSAE.from_sae(sae)
    assert (sharded.lo, sharded.hi, sharded.world) == (0, D_SAE, 1)
    with torch.no_grad():
        torch.testing.assert_close(sharded(x).latents, sae(x).latents, rtol=0, atol=1e-6)
        torch.testing.assert_close(sharded(x).recon, sae(x).recon, rtol=0, atol=1e-6)
    scores = torch.randn(4, 10)
    index, values = select_global(scores, torch.arange(10).expand(4, 10), 3)
    assert torch.equal(index.sort(-1).values, scores.topk(3).indices.sort(-1).values)
    assert torch.equal(values, scores.gather(-1, index))
    assert torch.equal(sharded.gather().state_dict()["W_enc"], sae.W_enc)


def test_a_world_size_that_does_not_divide_d_sae_is_refused():
    assert shard_bounds(32, 4, 3) == (24, 32)
    with pytest.raises(ConfigError, match=r"d_sae=30 is not a multiple of the world size 4"):
        shard_bounds(30, 4, 0)
    with pytest.raises(ConfigError, match="rank=2"):
        shard_bounds(32, 2, 2)
    with pytest.raises(ConfigError, match="holds"):
        ShardedSAE(SAEConfig(d_in=4, d_sae=8, k=2), {"W_enc": torch.zeros(4, 8)})


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_sharded_training_equals_sae_trainer(ranks, architecture):
    """TRAIN_STEPS ShardedTrainer steps on 2 ranks (init from the first batch, Adam per slice) give the SAE, the
    BatchTopK threshold and the losses of as many SAETrainer steps on the unsharded SAE (its AuxK stays off:
    no readout happens in 3 steps)."""
    _, results, train = ranks
    sae, batches = train[architecture]
    reference = SAE.from_tensors(sae.cfg, {n: v.clone() for n, v in sae.state_dict().items()})
    # ShardedTrainer selects in the weights' dtype; a readout per step: its loss; no latent is dead, AuxK stays off
    trainer = SAETrainer(reference, sync_every=1, compute_dtype="float32")
    for x in batches:
        trainer.step(x)
    trained = results[0][f"train-{architecture}"]["gathered"]
    assert results[1][f"train-{architecture}"]["gathered"] is None
    for name, value in reference.state_dict().items():
        assert (trained.state_dict()[name] - value).abs().max() <= 1e-5, name
    moved = (trained.W_dec - sae.W_dec).abs().max()
    assert moved > 1e-3, "training did not move the decoder: the comparison would prove nothing"
    for r in results:
        losses = r[f"train-{architecture}"]["losses"].tolist()
        assert losses == pytest.approx([m.loss for m in trainer.history], rel=1e-5)
