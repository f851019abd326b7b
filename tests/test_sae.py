"""The SAE module (issue 3): config checks, the identities every kind must satisfy, metrics."""

import math

import pytest
import torch

from vlmsae import metrics
from vlmsae.errors import ConfigError
from vlmsae.sae import ARCHITECTURES, SAE, SAEConfig, geometric_median

D_IN, D_SAE, K = 16, 64, 4


def make_sae(kind: str, **fields) -> SAE:
    torch.manual_seed(0)
    sae = SAE(d_in=D_IN, d_sae=D_SAE, k=K, architecture=kind, **fields)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        if kind in ("jumprelu", "batchtopk"):
            sae.threshold.uniform_(0, 0.3)
    return sae


@pytest.mark.parametrize("kind", ARCHITECTURES)
@pytest.mark.parametrize("training", [True, False])
def test_forward_is_decode_of_encode(kind, training):
    sae = make_sae(kind).train(training)
    x = torch.randn(3, 5, D_IN)
    out = sae(x)
    assert out.recon.shape == x.shape and out.latents.shape == (3, 5, D_SAE) and out.pre_acts.shape == (3, 5, D_SAE)
    torch.testing.assert_close(out.recon, sae.decode(sae.encode(x)), rtol=0, atol=0)
    torch.testing.assert_close(out.latents, sae.encode(x), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(D_IN,), (7, D_IN), (2, 3, 4, D_IN)])
def test_any_leading_shape(shape):
    sae = make_sae("topk")
    x = torch.randn(*shape)
    out = sae(x)
    assert out.recon.shape == shape and out.latents.shape == (*shape[:-1], D_SAE)
    torch.testing.assert_close(out.recon.reshape(-1, D_IN), sae(x.reshape(-1, D_IN)).recon)


def test_topk_keeps_exactly_k_per_token():
    sae = make_sae("topk")
    latents = sae.encode(torch.randn(100, D_IN))
    assert ((latents != 0).sum(-1) == K).all()
    assert (latents >= 0).all()


def test_batchtopk_keeps_k_per_token_on_average_and_uses_threshold_in_eval():
    sae = make_sae("batchtopk")
    x = torch.randn(50, D_IN)
    assert (sae.train().encode(x) != 0).sum() == K * 50
    latents = sae.eval().encode(x)
    pre = sae.pre_acts(x)
    torch.testing.assert_close(latents, pre * (pre > sae.threshold) * (pre > 0), rtol=0, atol=0)


def test_relu_and_jumprelu_activations():
    x = torch.randn(20, D_IN)
    relu = make_sae("relu")
    torch.testing.assert_close(relu.encode(x), relu.pre_acts(x).relu())
    jump = make_sae("jumprelu")
    pre, latents = jump.pre_acts(x), jump.encode(x)
    assert ((latents == 0) | (pre > jump.threshold)).all()
    torch.testing.assert_close(latents[pre > jump.threshold], pre[pre > jump.threshold])


def test_decoder_rows_start_at_unit_norm_and_encoder_is_their_transpose():
    for kind in ARCHITECTURES:
        sae = SAE(d_in=D_IN, d_sae=D_SAE, k=K, architecture=kind)
        norms = sae.W_dec.norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, 0.1 if kind == "relu" else 1.0))
        torch.testing.assert_close(sae.W_enc, sae.W_dec.T, rtol=0, atol=0)
        assert sae.W_enc.shape == (D_IN, D_SAE) and sae.W_dec.shape == (D_SAE, D_IN)


def test_normalize_decoder_and_remove_parallel_grad():
    sae = make_sae("topk")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    sae.W_dec.grad = torch.randn(D_SAE, D_IN)
    sae.remove_parallel_decoder_grad_()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(D_SAE), atol=1e-6, rtol=0)


def test_init_from_batch_sets_power_of_two_scale_and_returns_model_units():
    sae = SAE(d_in=D_IN, d_sae=D_SAE, k=K, normalize_activations=True)
    x = torch.randn(256, D_IN) * 37.0 + 5.0
    sae.init_from_batch(x)
    scale = float(sae.act_scale)
    assert math.frexp(scale)[0] == 0.5  # a power of two
    mean_norm = (x * scale).norm(dim=1).mean().item()
    assert math.sqrt(D_IN) / math.sqrt(2) <= mean_norm <= math.sqrt(D_IN) * math.sqrt(2)
    # With zero latents the reconstruction is b_dec, brought back to the model's units.
    torch.testing.assert_close(sae.decode(torch.zeros(D_SAE)), geometric_median(x * scale) / scale)
    assert (sae.decode(torch.zeros(D_SAE)) - x.mean(0)).norm() < 0.5 * 37


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_from_tensors_gives_the_same_sae_and_names_a_bad_tensor(kind):
    """``SAE.from_tensors(cfg, sae.state_dict())`` computes what ``sae`` computes, bit for bit, with the same
    W_enc storage; a missing, extra or misshapen tensor is a ConfigError naming it."""
    sae = make_sae(kind, normalize_activations=True)
    sae.init_from_batch(torch.randn(64, D_IN) * 5)
    tensors = {name: t.clone() for name, t in sae.state_dict().items()}
    copy = SAE.from_tensors(sae.cfg, tensors)
    x = torch.randn(3, 5, D_IN)
    for training in (True, False):
        assert all(torch.equal(a, b) for a, b in zip(sae.train(training)(x), copy.train(training)(x)))
    assert copy.W_enc.stride() == sae.W_enc.stride()
    assert [n for n, _ in copy.named_parameters()] == [n for n, _ in sae.named_parameters()]
    assert [n for n, _ in copy.named_buffers()] == [n for n, _ in sae.named_buffers()]
    with pytest.raises(ConfigError, match="act_scale"):
        SAE.from_tensors(sae.cfg, {n: t for n, t in tensors.items() if n != "act_scale"})
    with pytest.raises(ConfigError, match="'b_dec' has shape"):
        SAE.from_tensors(sae.cfg, {**tensors, "b_dec": tensors["b_dec"][:-1]})


def test_geometric_median_resists_outliers():
    points = torch.randn(200, 3) * 0.1
    points[:20] += 1000.0
    assert geometric_median(points).norm() < 1.0
    assert points.mean(0).norm() > 50.0


@pytest.mark.parametrize(
    "fields, fragment",
    [
        (dict(d_in=16, d_sae=8, k=9), "k=9 must be in 1..d_sae=8"),
        (dict(d_in=16, architecture="gated"), "architecture='gated' is unknown"),
        (dict(d_in=0), "d_in=0"),
        (dict(d_in=16, k=0), "k=0"),
        (dict(d_in=16, dtype="float33"), "dtype='float33' is not a dtype"),
        (dict(d_in=16, l1_coefficient=-1.0), "l1_coefficient=-1.0"),
        (dict(d_in=16, jumprelu_bandwidth=0.0), "jumprelu_bandwidth=0.0"),
        (dict(d_in=16, b_dec_init="median"), "b_dec_init='median'"),
        (dict(d_in=16, metadata={"when": object()}), "metadata must be JSON-serialisable"),
        (dict(d_in=16, d_sae=8, k=2, aux_k=9), "aux_k=9"),
    ],
)
def test_config_rejects_bad_values_with_the_fix(fields, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        SAEConfig(**fields)


def test_config_defaults():
    cfg = SAEConfig(d_in=24)
    assert cfg.d_sae == 32 * 24 and cfg.architecture == "topk" and cfg.aux_k == 12
    assert SAEConfig(d_in=24, architecture="relu").l1_coefficient == 1e-3
    assert SAEConfig(d_in=24, d_sae=8, architecture="relu").k == 32  # k only binds the TopK kinds
    with pytest.raises(ConfigError, match="not both"):
        SAE(cfg, d_in=3)
    sae = SAE(d_in=8, d_sae=16, k=2, metadata={"hook_name": "blocks.9.hook_resid_post"})
    assert sae.metadata["hook_name"] == "blocks.9.hook_resid_post"


def test_metrics_definitions():
    x = torch.randn(100, 8) * 3 + 1
    assert metrics.fvu(x, x) == 0
    torch.testing.assert_close(metrics.fvu(x, x.mean(0).expand_as(x)), torch.tensor(1.0))
    torch.testing.assert_close(metrics.mse(x, torch.zeros_like(x)), x.pow(2).mean())
    latents = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    assert metrics.l0(latents) == 1.5
    assert metrics.dead_fraction(torch.tensor([0, 5, 10, 20]), window=10) == 0.5
    assert metrics.dense_fraction(torch.tensor([0, 5, 50, 90]), n_tokens=100, threshold=0.1) == 0.5
