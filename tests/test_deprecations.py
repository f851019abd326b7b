"""Names renamed in 0.2 keep working until 0.3: each warns once per use, names its successor, and gives what
the new name gives. Passing an old and a new name together is an error."""

import json
import warnings

import pytest
import torch

import vlmsae
from vlmsae import analysis, plots, saeconfig
from vlmsae.sae import SAE, SAEConfig
from vlmsae.testbed import concepts
from vlmsae.zoo import tiny_inputs, tiny_model

LAYER = 1


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = tiny_model("llava")
    sae = SAE(d_in=vlmsae.layers(model).d_model, d_sae=64, architecture="relu").eval()
    return model, sae, tiny_inputs(model, 2)


def deprecated(new: str):
    """Expect exactly one DeprecationWarning that names ``new`` and the release that removes the old name."""
    return pytest.warns(DeprecationWarning, match=rf"removed in vlmsae 0\.3; use {new}")


def test_recording_mask_is_kinds(setup):
    model, _, inputs = setup
    with torch.no_grad(), vlmsae.record(model, [LAYER]) as rec:
        model(**inputs)
    with deprecated(r"Recording\.kinds\(layer\)"):
        old = rec.mask(LAYER)
    assert torch.equal(old, rec.kinds(LAYER))


def test_error_is_use_error_term(setup):
    model, sae, inputs = setup
    edit = lambda z, fwd: z * 2  # noqa: E731
    with torch.no_grad(), vlmsae.splice(model, LAYER, sae, use_error_term=True, edit=edit):
        new = model(**inputs).logits
    with deprecated("use_error_term="), torch.no_grad(), vlmsae.splice(model, LAYER, sae, error=True, edit=edit):
        old = model(**inputs).logits
    assert torch.equal(old, new)
    x = torch.randn(2, 3, sae.cfg.d_in)
    with deprecated("use_error_term="):
        old = vlmsae.reconstruct(x, sae, error=True)
    assert torch.equal(old, vlmsae.reconstruct(x, sae, use_error_term=True))
    with pytest.raises(vlmsae.ConfigError, match=r"^splice\(\) got both error= and use_error_term=; pass only "
                                                 r"use_error_term="):
        with vlmsae.splice(model, LAYER, sae, error=True, use_error_term=True):
            pass


def test_kind_is_architecture(tmp_path):
    with deprecated("architecture="):
        sae = SAE(d_in=8, d_sae=16, kind="jumprelu")
    assert sae.cfg.architecture == "jumprelu"
    with deprecated("architecture="):
        cfg = SAEConfig(d_in=8, d_sae=16, kind="relu")
    assert cfg == SAEConfig(d_in=8, d_sae=16, architecture="relu")
    with deprecated(r"SAEConfig\.architecture"):
        assert cfg.kind == "relu"
    with deprecated(r"vlmsae\.saeconfig\.ARCHITECTURES"):
        assert saeconfig.KINDS == saeconfig.ARCHITECTURES
    with pytest.raises(vlmsae.ConfigError, match=r"^SAEConfig\(\) got both kind= and architecture="):
        SAEConfig(d_in=8, kind="relu", architecture="topk")


def test_a_file_written_before_the_rename_opens_without_a_warning(tmp_path):
    """Files keep their old key: vlmsae.config.kind in a cfg.json written by 0.1 opens silently."""
    sae = SAE(d_in=8, d_sae=16, k=4, architecture="batchtopk")
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    own = cfg["vlmsae"]["config"]
    own["kind"] = own.pop("architecture")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = SAE.load(tmp_path)
    assert loaded.cfg.architecture == "batchtopk"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sae.state_dict().values()))


def test_features_are_latents(setup):
    model, sae, inputs = setup
    with deprecated("latents="), torch.no_grad(), vlmsae.ablate(model, LAYER, sae, features=[1, 2]):
        old = model(**inputs).logits
    with torch.no_grad(), vlmsae.ablate(model, LAYER, sae, latents=[1, 2]):
        new = model(**inputs).logits
    assert torch.equal(old, new)
    with deprecated("latents="):
        old = vlmsae.interventions.steering_vector(sae, features={3: 2.0})
    assert torch.equal(old, vlmsae.interventions.steering_vector(sae, latents={3: 2.0}))
    with deprecated(r"vlmsae\.analysis\.latent_table"):
        assert analysis.feature_table is analysis.latent_table
    with deprecated(r"vlmsae\.testbed\.concepts\.best_latents"):
        assert concepts.best_features is concepts.best_latents


def test_scan_k_is_n_examples(setup):
    model, sae, inputs = setup
    with deprecated("n_examples="):
        old = vlmsae.scan(model, LAYER, sae, [inputs], k=3, latents=[0, 5])
    new = vlmsae.scan(model, LAYER, sae, [inputs], n_examples=3, latents=[0, 5])
    assert torch.equal(old.top.values, new.top.values) and old.top.values.shape == (2, 3)
    with deprecated(r"TopExamples\.latents"):
        assert torch.equal(new.top.features, new.top.latents)
    with deprecated("latent="):
        plots.top_images(new.top, feature=int(new.top.latents[0]), images=torch.rand(2, 3, 32, 32))
