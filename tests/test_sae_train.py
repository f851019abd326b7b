"""The training step (issue 3): the sparse path equals the dense one, the trainer learns, and it learns features."""

import math

import pytest
import torch
from conftest import assert_step_equals_dense_step

from vlmsae import Kind, metrics
from vlmsae import trainer as trainer_module
from vlmsae.errors import ConfigError, NonFiniteError
from vlmsae.sae import ARCHITECTURES, SAE
from vlmsae.saeconfig import SAEConfig
from vlmsae.sparse import SparseCode, gather_pre_acts, sparse_decode
from vlmsae.trainer import SAETrainer, SAETrainerConfig


@pytest.fixture
def one_thread():
    """Many small steps: one thread is as fast, and does not stall when other jobs hold the second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def float64_sae(kind: str, d_in: int, d_sae: int, k: int) -> SAE:
    torch.manual_seed(0)
    sae = SAE(d_in=d_in, d_sae=d_sae, k=k, architecture=kind).double()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def grads(sae: SAE) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("d_sae, k", [(512, 4), (64, 8)])  # a sparse and a dense-enough entry-gradient path
def test_sparse_topk_path_matches_dense_outputs_and_gradients(d_sae, k):
    sae = float64_sae("topk", 16, d_sae, k)
    x = torch.randn(40, 16, dtype=torch.float64)
    out = sae(x)
    dense_loss = metrics.mse(x, out.recon)
    dense_loss.backward()
    expected = grads(sae)

    u = sae.center(x)
    values, latents = (u @ sae.W_enc + sae.b_enc).detach().topk(k, dim=1)
    code = SparseCode.from_topk(latents)
    pre = gather_pre_acts(u, sae.W_enc.T, sae.b_enc, code, values.reshape(-1))
    recon = sparse_decode(pre.relu(), sae.W_dec, code) + sae.b_dec
    torch.testing.assert_close(recon, out.recon, rtol=1e-12, atol=1e-12)
    metrics.mse(x, recon).backward()
    got = grads(sae)
    assert got.keys() == expected.keys() == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)
        assert got[name].stride() == expected[name].stride(), name


def test_sparse_decode_with_uneven_rows_matches_dense():
    torch.manual_seed(0)
    W_dec = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    latents = torch.randn(6, 30, dtype=torch.float64) * (torch.rand(6, 30) < 0.2)
    latents[2] = 0  # a token with no active latent
    rows, cols = latents.nonzero(as_tuple=True)
    values = latents[rows, cols].clone().requires_grad_()
    recon = sparse_decode(values, W_dec, SparseCode.from_rows_cols(rows, cols, 6))
    grad_out = torch.randn_like(recon)
    (recon * grad_out).sum().backward()
    dense = latents.clone().requires_grad_()
    expected = dense @ W_dec.detach()
    torch.testing.assert_close(recon, expected)
    (expected * grad_out).sum().backward()
    torch.testing.assert_close(values.grad, dense.grad[rows, cols])
    torch.testing.assert_close(W_dec.grad, latents.T @ grad_out)


def step_once(sae: SAE, x: torch.Tensor, **fields) -> SAETrainer:
    trainer = SAETrainer(sae, lr=1e-3, init_from_first_batch=False, sync_every=1, **fields)
    trainer.step(x)
    return trainer


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_trainer_sparse_step_equals_dense_autograd_step(kind):
    """With dead latents (AuxK on), one sparse trainer step lands where the dense reference lands."""
    torch.manual_seed(0)
    x = torch.randn(32, 16, dtype=torch.float64)
    sae, reference = float64_sae(kind, 16, 128, 4), float64_sae(kind, 16, 128, 4)
    trainer = SAETrainer(sae, lr=1e-3, init_from_first_batch=False, sync_every=1)
    trainer.tokens_since_fired[:40] = sae.cfg.dead_tokens  # 40 dead latents
    trainer.read_metrics()  # a readout sees them: AuxK's candidates
    trainer.step(x)

    # Dense reference, written from the definitions: MSE + coef * scale * AuxK MSE.
    out = reference.train()(x)
    loss = metrics.mse(x, out.recon)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[:40] = True
    aux_k = reference.cfg.aux_k
    values, latents = out.pre_acts.masked_fill(~dead, -math.inf).topk(aux_k, dim=1)
    aux_latents = torch.zeros_like(out.pre_acts).scatter(1, latents, values.relu())
    residual = (x - out.recon).detach()
    aux = metrics.mse(residual, aux_latents @ reference.W_dec) * min(40 / aux_k, 1.0)
    assert_step_equals_dense_step(sae, reference, loss + reference.cfg.aux_coefficient * aux)
    metrics_ = trainer.history[-1]
    assert metrics_.aux_loss > 0 and metrics_.l0 == pytest.approx(4.0, abs=0.5)
    # a one-step window reads out that step's loss and AuxK loss
    assert metrics_.loss == pytest.approx((loss + reference.cfg.aux_coefficient * aux).item(), rel=1e-9)
    assert metrics_.aux_loss == pytest.approx(aux.item(), rel=1e-9)


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_matryoshka_step_equals_the_dense_sum_of_prefix_losses(kind):
    """Matryoshka (Bussmann et al. 2025): the step's loss is the MSE of the whole SAE plus that of each inner
    prefix of the latents decoding the same selection; one sparse step lands where the dense reference lands."""
    torch.manual_seed(0)
    x = torch.randn(32, 16, dtype=torch.float64)
    widths = (8, 32, 128)
    sae, reference = float64_sae(kind, 16, 128, 4), float64_sae(kind, 16, 128, 4)
    for s in (sae, reference):
        s.cfg.matryoshka_widths = widths
    trainer = SAETrainer(sae, lr=1e-3, init_from_first_batch=False, sync_every=1)
    trainer.step(x)

    out = reference.train()(x)
    loss = metrics.mse(x, out.recon)
    for width in widths[:-1]:
        inner = out.latents[:, :width] @ reference.W_dec[:width] + reference.b_dec
        loss = loss + metrics.mse(x, inner)
    assert_step_equals_dense_step(sae, reference, loss)
    assert trainer.history[-1].loss == pytest.approx(loss.item(), rel=1e-9)


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_one_matryoshka_level_is_the_plain_architecture(kind):
    """matryoshka_widths=[d_sae] (one level) trains exactly as plain TopK / BatchTopK (as SAELens tests)."""
    torch.manual_seed(0)
    xs = [torch.randn(64, 16) for _ in range(4)]
    plain, nested = float64_sae(kind, 16, 128, 4).float(), float64_sae(kind, 16, 128, 4).float()
    nested.cfg.matryoshka_widths = (128,)
    for sae in (plain, nested):
        trainer = SAETrainer(sae, sync_every=2)
        for x in xs:
            trainer.step(x)
    for name, p in plain.state_dict().items():
        assert torch.equal(nested.state_dict()[name], p), name


def test_matryoshka_widths_are_checked_and_saved(tmp_path):
    cfg = SAEConfig(d_in=16, d_sae=64, architecture="batchtopk", matryoshka_widths=[4, 16])
    assert cfg.matryoshka_widths == (4, 16, 64)  # the whole SAE is the last level
    for bad, match in (([16, 4], "increase strictly"), ([0, 64], "increase strictly"), ([], "non-empty"),
                       ([4, 128], "increase strictly"), ("4,16", "list of integers")):
        with pytest.raises(ConfigError, match=match):
            SAEConfig(d_in=16, d_sae=64, architecture="batchtopk", matryoshka_widths=bad)
    with pytest.raises(ConfigError, match="topk architectures, not architecture='relu'"):
        SAEConfig(d_in=16, d_sae=64, architecture="relu", matryoshka_widths=[4, 64])
    sae = SAE(d_in=16, d_sae=64, architecture="batchtopk", k=4, matryoshka_widths=[4, 16])
    sae.save(tmp_path / "m")
    assert SAE.load(tmp_path / "m").cfg.matryoshka_widths == (4, 16, 64)


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
@pytest.mark.parametrize("factor", [0.0, math.inf], ids=["sparse_auxk", "dense_auxk"])
@pytest.mark.parametrize("n_dead", [5, 40])  # fewer dead latents than aux_k = 8 (the loss scaled down), and more
def test_auxk_loss_and_gradients_equal_the_dense_reference(kind, factor, n_dead):
    """Both AuxK passes give the loss and every gradient of the definition (Gao et al. 2024 §A.2), over the
    latents dead at the last readout that are still dead: one revived since is left out, one dead since too."""
    torch.manual_seed(0)
    x = torch.randn(32, 16, dtype=torch.float64)
    sae, reference = float64_sae(kind, 16, 128, 4), float64_sae(kind, 16, 128, 4)
    trainer = SAETrainer(sae, init_from_first_batch=False, dense_auxk_factor=factor)
    dead_tokens = sae.cfg.dead_tokens
    trainer.tokens_since_fired[:n_dead] = dead_tokens
    trainer.read_metrics()  # the readout: latents 0..n_dead-1 are AuxK's candidates
    trainer.tokens_since_fired[0] = 0  # revived since the readout
    trainer.tokens_since_fired[100] = dead_tokens  # died since: joins at the next readout
    assert trainer.aux_candidates.tolist() == list(range(n_dead))
    assert trainer.auxk_is_dense(sae.cfg.aux_k) == (factor > 0)
    out = trainer._sparse_loss(x)
    out.loss.backward()
    got = grads(sae)

    # Dense reference from the definitions: MSE + coef * min(n_dead / aux_k, 1) * AuxK MSE.
    dead = torch.zeros(128, dtype=torch.bool)
    dead[1:n_dead] = True
    full = reference.train()(x)
    aux_k = reference.cfg.aux_k
    values, latents = full.pre_acts.masked_fill(~dead, -math.inf).topk(aux_k, dim=1)
    aux_latents = torch.zeros_like(full.pre_acts).scatter(1, latents, values.relu())
    residual = (x - full.recon).detach()
    aux = metrics.mse(residual, aux_latents @ reference.W_dec) * min((n_dead - 1) / aux_k, 1.0)
    loss = metrics.mse(x, full.recon) + reference.cfg.aux_coefficient * aux
    loss.backward()
    expected = grads(reference)
    torch.testing.assert_close(out.aux_loss, aux.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-12, atol=0)
    assert got.keys() == expected.keys() == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-13, msg=name)
    assert got["W_enc"].T.is_contiguous()  # the layout Adam's alias of W_enc expects (see SAETrainer.__init__)


def test_a_readout_refreshes_the_auxk_candidates():
    """The candidates are the latents dead at the last readout; AuxK is off until a readout has seen one."""
    sae = SAE(d_in=8, d_sae=32, k=2)
    trainer = SAETrainer(sae, sync_every=10**6)
    assert not trainer.aux_active
    trainer.tokens_since_fired[[3, 7, 30]] = sae.cfg.dead_tokens
    assert not trainer.aux_active  # no readout yet
    assert trainer.read_metrics().dead_fraction == 3 / 32
    assert trainer.aux_active and trainer.aux_candidates.tolist() == [3, 7, 30]
    tensors, meta = trainer.state_dict()
    resumed = SAETrainer(SAE(d_in=8, d_sae=32, k=2))
    resumed.load_state_dict(tensors, meta)
    assert resumed.aux_candidates.tolist() == [3, 7, 30]
    del tensors["aux_candidates"]  # a checkpoint written before the candidates: those dead now, if AuxK ran
    resumed.load_state_dict(tensors, meta | {"aux_active": True})
    assert resumed.aux_candidates.tolist() == [3, 7, 30]
    trainer.tokens_since_fired[7] = 0
    trainer.read_metrics()
    assert trainer.aux_candidates.tolist() == [3, 30]
    trainer.tokens_since_fired.zero_()
    trainer.read_metrics()
    assert not trainer.aux_active


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_every_kind_trains(kind, one_thread):
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(64, 16), dim=1)

    def batch():
        on = torch.rand(256, 64) < 0.05
        return (on * (torch.rand(256, 64) + 0.5)) @ directions * 10

    sae = SAE(d_in=16, d_sae=128, k=4, architecture=kind, normalize_activations=True, l1_coefficient=0.1, l0_coefficient=3e-3)
    trainer = SAETrainer(sae, lr=3e-3, sync_every=20)
    for _ in range(120):
        trainer.step(batch())
    first, last = trainer.history[0], trainer.history[-1]
    assert len(trainer.history) == 6 and last.tokens == 120 * 256
    assert last.fvu < first.fvu and last.fvu < 0.5, (first, last)
    assert 0 < last.l0 < 64
    if sae.unit_norm_decoder:
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))
    if kind == "batchtopk":
        assert (sae.threshold > 0).all() and (sae.threshold == sae.threshold[0]).all()
    # The trainer's FVU is the metrics module's FVU.
    x = batch()
    sae.eval()
    fvu = metrics.fvu(x, sae(x).recon)
    assert fvu < 0.5


def test_readout_is_the_only_sync_and_catches_nan():
    sae = SAE(d_in=8, d_sae=32, k=2)
    trainer = SAETrainer(sae, sync_every=3)
    for _ in range(2):
        trainer.step(torch.randn(16, 8))
    assert trainer.history == []
    trainer.step(torch.randn(16, 8))
    assert len(trainer.history) == 1 and trainer.history[0].step == 3
    bad = torch.randn(16, 8)
    bad[0, 0] = float("nan")
    trainer.step(bad)
    trainer.step(torch.randn(16, 8))
    with pytest.raises(NonFiniteError,
                       match="steps 4..6; check the activations for NaN/Inf or lower the learning rate$"):
        trainer.step(torch.randn(16, 8))



def test_readout_is_the_window_average_of_the_steps():
    """A readout, recomputed by hand from each step's batch and the weights it started from: loss and AuxK loss
    per step, MSE per element and FVU in the model's units, L0, dead and dense fractions."""
    torch.manual_seed(0)
    d_in, d_sae, k, n = 16, 48, 4, 32  # some latents die (AuxK turns on), some fire on over 10% of tokens
    sae = SAE(d_in=d_in, d_sae=d_sae, k=k, normalize_activations=True, dead_tokens=2 * n).double()
    trainer = SAETrainer(sae, lr=1e-3, sync_every=3)
    trainer.step(torch.randn(n, d_in, dtype=torch.float64) * 0.02)  # step 1 sets act_scale and b_dec
    assert sae.act_scale != 1
    fired = []  # per step from step 2 on, the latents that fired
    window = dict.fromkeys(("loss", "aux", "squared_error", "variance", "nonzero"), 0.0)
    fire_count = torch.zeros(d_sae)
    for step in range(2, 7):
        x = torch.randn(n, d_in, dtype=torch.float64) * 0.02  # a window's variance is under 1
        with torch.no_grad():
            scale = sae.act_scale.double()
            x_n = x * scale
            pre = (x_n - sae.b_dec) @ sae.W_enc + sae.b_enc
            top = pre.topk(k, dim=1)
            latents = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
            recon_n = latents @ sae.W_dec + sae.b_dec
            if step >= 4:  # the second window
                dead = ~(fired[-1] | fired[-2])  # dead_tokens is two batches: fired in neither of the last two steps
                # AuxK runs once a readout has seen dead latents (the first one, after step 3, did)
                values, chosen = pre.masked_fill(~dead, -math.inf).topk(sae.cfg.aux_k, dim=1)
                aux_latents = torch.zeros_like(pre).scatter(1, chosen, values.relu())
                aux = metrics.mse(x_n - recon_n, aux_latents @ sae.W_dec) * min(dead.sum().item() / sae.cfg.aux_k, 1)
                window["loss"] += (metrics.mse(x_n, recon_n) + sae.cfg.aux_coefficient * aux).item()
                window["aux"] += aux.item()
                window["squared_error"] += ((x_n - recon_n).pow(2).sum() / scale**2).item()
                window["variance"] += ((x_n - x_n.mean(0)).pow(2).sum() / scale**2).item()
                window["nonzero"] += (latents != 0).sum().item()
                fire_count += (latents != 0).sum(0)
        fired.append((latents != 0).any(0))
        trainer.step(x)
        if step == 3:
            assert trainer.history[0].dead_fraction == pytest.approx((~(fired[0] | fired[1])).double().mean().item())
            assert trainer.history[0].dead_fraction > 0
    last = trainer.history[-1]
    assert len(trainer.history) == 2 and (last.step, last.tokens) == (6, 6 * n)
    assert last.loss == pytest.approx(window["loss"] / 3, rel=1e-9)
    assert last.aux_loss == pytest.approx(window["aux"] / 3, rel=1e-9) and last.aux_loss > 0
    # the trainer sums squared errors in float32 (metrics.squared_error): float32 precision
    assert last.mse == pytest.approx(window["squared_error"] / (3 * n * d_in), rel=1e-6)
    assert last.fvu == pytest.approx(window["squared_error"] / window["variance"], rel=1e-6)
    assert last.l0 == pytest.approx(window["nonzero"] / (3 * n), rel=1e-12)
    # fractions of 48 latents, computed in float32
    assert last.dead_fraction == pytest.approx((~(fired[-1] | fired[-2])).double().mean().item(), abs=1e-7)
    assert last.dense_fraction == pytest.approx((fire_count > 0.1 * 3 * n).double().mean().item(), abs=1e-7)
    assert 0 < last.dense_fraction < 1


def test_a_batch_without_variance_has_no_fvu():
    trainer = SAETrainer(SAE(d_in=8, d_sae=32, k=2), sync_every=2)
    for _ in range(2):
        trainer.step(torch.full((16, 8), 0.3))
    assert math.isnan(trainer.history[-1].fvu) and math.isfinite(trainer.history[-1].loss)


def test_activations_in_another_dtype_are_cast_to_the_sae():
    """A bfloat16 buffer feeding an fp32 SAE: the step is the one on the same values in fp32."""
    x = torch.randn(32, 16).bfloat16()
    steps = []
    for batch in (x, x.float()):
        torch.manual_seed(0)
        sae = SAE(d_in=16, d_sae=64, k=4)
        SAETrainer(sae, lr=1e-3, sync_every=1).step(batch)
        steps.append(sae.state_dict())
    for name, value in steps[0].items():
        assert value.dtype == torch.float32 and torch.equal(value, steps[1][name]), name


def test_jumprelu_threshold_never_goes_below_zero():
    torch.manual_seed(0)
    sae = SAE(d_in=16, d_sae=64, architecture="jumprelu", l0_coefficient=0.0)  # nothing holds the thresholds up
    trainer = SAETrainer(sae, lr=1e-2, sync_every=10)
    for _ in range(20):
        trainer.step(torch.randn(64, 16))
        assert (sae.threshold >= 0).all()
    assert (sae.threshold == 0).any()  # the clamp did hold some


def test_trainer_config_checks():
    with pytest.raises(ConfigError, match="lr=2"):
        SAETrainerConfig(lr=2)
    with pytest.raises(ConfigError, match="sync_every=0"):
        SAETrainerConfig(sync_every=0)
    with pytest.raises(ConfigError, match="compute_dtype='fp8'"):
        SAETrainerConfig(compute_dtype="fp8")


def test_bf16_compute_keeps_fp32_weights():
    """The GPU recipe (bf16 matmuls over fp32 master weights), run on the CPU."""
    for kind in ARCHITECTURES:
        sae = SAE(d_in=16, d_sae=64, k=4, architecture=kind)
        trainer = SAETrainer(sae, compute_dtype="bfloat16", sync_every=2)
        for _ in range(2):
            trainer.step(torch.randn(32, 16))
        assert all(p.dtype == torch.float32 for p in sae.parameters())
        assert math.isfinite(trainer.history[-1].loss)


def test_ground_truth_features_are_recovered(one_thread):
    """512 unit directions in 128 dims, ~4 active per sample: the decoder must find them (mean max cosine >= 0.97)."""
    torch.manual_seed(0)
    n_true, d_in = 512, 128
    true = torch.nn.functional.normalize(torch.randn(n_true, d_in), dim=1)
    generator = torch.Generator().manual_seed(1)

    def batch(n: int) -> torch.Tensor:
        active = torch.rand(n, n_true, generator=generator) < 4 / n_true
        return (active * (torch.rand(n, n_true, generator=generator) + 0.5)) @ true

    sae = SAE(d_in=d_in, d_sae=1024, k=4, dead_tokens=20 * 1024)
    trainer = SAETrainer(sae, lr=3e-3, sync_every=100)
    for _ in range(300):
        trainer.step(batch(1024))
    decoder = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    max_cosine = (true @ decoder.T).max(dim=1).values
    print(f"\nground truth: mean max cosine {max_cosine.mean():.4f} (min {max_cosine.min():.3f}) "
          f"over {n_true} true features; last window {trainer.history[-1]}")
    assert max_cosine.mean() >= 0.97


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_has_no_host_sync():
    sae = SAE(d_in=64, d_sae=1024, k=8, device="cuda")
    trainer = SAETrainer(sae, sync_every=1000)
    x = torch.randn(512, 64, device="cuda")
    trainer.step(x)
    trainer.tokens_since_fired[:100] = sae.cfg.dead_tokens
    trainer.read_metrics()  # the readout (a sync) makes those 100 AuxK's candidates
    trainer.tokens_since_fired[:10] = 0  # revived since
    trainer.tokens_since_fired[200:210] = sae.cfg.dead_tokens  # died since
    torch.cuda.set_sync_debug_mode("error")
    try:
        for factor in (0.0, math.inf):  # the sparse AuxK pass, then the dense one
            trainer.dense_auxk_factor = factor
            assert trainer.auxk_is_dense(sae.cfg.aux_k) == (factor > 0)
            for _ in range(3):
                trainer.step(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    assert trainer.read_metrics().aux_loss > 0



def test_bf16_selection_keeps_full_precision_values():
    """bf16 scores pick the latents; the values decoded are the float32 pre-activations at those latents."""
    torch.manual_seed(0)
    sae = SAE(d_in=32, d_sae=256, k=8)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    trainer = SAETrainer(sae, compute_dtype="bfloat16", init_from_first_batch=False)
    x = torch.randn(64, 32)
    _, recon, *_ = trainer._sparse_loss(x)
    u = sae.center(x).detach()
    chosen = torch.addmm(sae.b_enc.bfloat16(), u.bfloat16(), sae.W_enc.bfloat16()).topk(8, dim=1).indices
    exact = sae.pre_acts(x).detach().gather(1, chosen).relu()
    expected = torch.zeros(64, 256).scatter(1, chosen, exact) @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(recon, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dead_tokens", [10_000_000, 100])
def test_dead_is_silent_over_the_last_window_tokens_and_a_short_run_reports_it(dead_tokens):
    """One definition of dead: fired on none of the last W tokens, W = min(dead_tokens, tokens trained). A run
    shorter than dead_tokens reports the latents that never fired (not 0), and AuxK then trains them. The
    reference: ten latents built not to fire, and which latents fired, taken from sae.encode on every step's batch
    with the weights of that step. A trainer resumed mid-run from state_dict goes on exactly."""
    torch.manual_seed(0)
    sae = SAE(d_in=16, d_sae=64, k=4, dead_tokens=dead_tokens)
    with torch.no_grad():  # ten latents whose pre-activations are 100x smaller: never in a token's top 4, yet
        sae.W_enc[:, :10] *= 0.01  # often above 0, so that AuxK, once on, trains them
        sae.b_enc[:10] = 0
    trainer = SAETrainer(sae, lr=1e-3, init_from_first_batch=False, sync_every=5)
    batches = [torch.randn(64, 16) for _ in range(10)]
    fired = []
    for i, x in enumerate(batches):
        with torch.no_grad():
            fired.append((sae.encode(x) > 0).any(0))
        trainer.step(x)
        if i == 5:  # mid-window, AuxK on: a resumed trainer must keep the window and go on exactly
            resumed = SAETrainer(SAE(d_in=16, d_sae=64, k=4, dead_tokens=dead_tokens), lr=1e-3,
                                 init_from_first_batch=False, sync_every=5)
            resumed.load_state_dict(*trainer.state_dict())
    for x in batches[6:]:
        resumed.step(x)
    first, second = trainer.history
    for name, value in sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], value), name
    assert [first.dead_window, second.dead_window] == [min(dead_tokens, 320), min(dead_tokens, 640)]
    steps_in_window = [(first, 5, math.ceil(first.dead_window / 64)), (second, 10, math.ceil(second.dead_window / 64))]
    for readout, end, n in steps_in_window:  # the reference: silent on each of the last n steps' batches
        silent = ~torch.stack(fired[end - n:end]).any(0)
        assert silent[:10].all() or end > 5
        assert readout.dead_fraction == pytest.approx(silent.double().mean().item())
    assert first.aux_loss == 0 and second.aux_loss > 0  # AuxK trains what the first readout found dead


def test_batchtopk_selection_on_cpu_picks_what_one_topk_picks():
    """The sampled bound before BatchTopK's topk (CPU) never changes the pick: the largest k * n_tokens entries in
    index order, as one topk over the whole batch; also when the sample overshoots and a topk over all runs."""
    from vlmsae.trainer import _largest_entries

    def reference(pre, count):
        values, indices = pre.reshape(-1).topk(count)
        order = indices.argsort()
        return values[order], indices[order]

    torch.manual_seed(0)
    # float64: no ties at the boundary, where any pick is right
    pre = torch.randn(1024, 1000, dtype=torch.float64)  # d_sae not a power of two: the stride must reach every latent
    pre[:, 7] += 3  # one latent fires on most tokens
    overshoot = torch.randn(1024 * 1000, dtype=torch.float64)
    overshoot[::17] += 100  # the entries the sample sees (stride 17) all large, but fewer than count of them
    for x, count in ((pre, 25 * 1024), (pre, 8 * 1024), (overshoot.view(1024, 1000), 1024 * 1000 // 16)):
        values, indices = _largest_entries(x, count)
        want_values, want_indices = reference(x, count)
        assert torch.equal(indices, want_indices) and torch.equal(values, want_values)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_the_cpu_selects_in_bf16_by_default_only_where_it_multiplies_bf16_natively(monkeypatch, native_bf16):
    """compute_dtype=None: a bf16 selection for the TopK kinds on a CPU with native bf16 (values, loss and gradients
    stay float32), float32 on one without and for the dense kinds; an explicit compute_dtype always wins."""
    monkeypatch.setattr(trainer_module, "_cpu_has_native_bf16", lambda: native_bf16)
    fast = torch.bfloat16 if native_bf16 else torch.float32
    for kind, want in (("topk", fast), ("batchtopk", fast), ("relu", torch.float32), ("jumprelu", torch.float32)):
        assert SAETrainer(SAE(d_in=8, d_sae=32, k=2, architecture=kind)).compute_dtype == want, kind
    half = SAE(d_in=8, d_sae=32, k=2).to(torch.bfloat16)  # trains a float32 working copy
    assert SAETrainer(half).compute_dtype == fast
    assert SAETrainer(SAE(d_in=8, d_sae=32, k=2), compute_dtype="float32").compute_dtype == torch.float32
    assert SAETrainer(SAE(d_in=8, d_sae=32, k=2).double()).compute_dtype == torch.float64


@pytest.mark.parametrize("recipe", [dict(architecture="topk"), dict(architecture="topk", k_per_kind={"image": 2, "text": 6}),
                                    dict(architecture="topk", normalize_per_kind=True, normalize_activations=False),
                                    dict(architecture="relu")])
def test_reconstruct_is_the_sae_forward(recipe):
    """The readouts' reconstruction (TopK: the step's selection and sparse decode) equals SAE.forward on the same
    rows: the reconstruction in the model's units and the set of non-zero (row, latent) entries."""
    torch.manual_seed(0)
    sae = SAE(d_in=16, d_sae=64, k=4, **recipe)
    trainer = SAETrainer(sae, compute_dtype="float32")
    x = torch.randn(48, 16) * 3 + 1
    kinds = torch.tensor([int(Kind.IMAGE), int(Kind.TEXT)] * 24, dtype=torch.int8)
    for _ in range(3):
        trainer.step(x, kinds=kinds)
    recon, rows, cols = trainer.reconstruct(x, kinds)
    with torch.no_grad():
        out = sae(x, kinds)
    torch.testing.assert_close(recon, out.recon, rtol=1e-5, atol=1e-5)
    want = out.latents.nonzero()
    assert sorted(zip(rows.tolist(), cols.tolist())) == sorted(map(tuple, want.tolist()))
