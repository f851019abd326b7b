"""MLP sites and transcoders (issue 14, item 4): Gemma Scope 2 style transcoders on a tiny Gemma 3.

References come from plain PyTorch hooks on the layer's own modules (the MLP's input is what ``layer.mlp`` is called
with; what the MLP adds to the residual is ``layer.post_feedforward_layernorm``'s output in Gemma 3, ``layer.mlp``'s
elsewhere), never from vlmsae's hooks. The files against real SAELens: tests/interop/test_interop.py.
"""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import vlmsae
from vlmsae.adapters import Kind
from vlmsae.errors import ConfigError, SAEFileError, SiteError
from vlmsae.sites import hook_name, parse_site
from vlmsae.sae import Transcoder
from vlmsae.zoo import tiny_inputs

from conftest import logits

LAYER = 1
# The module whose output is what the MLP adds to the residual, read off each family's decoder layer class.
MLP_OUT_MODULE = {"gemma3": "post_feedforward_layernorm", "paligemma": "post_feedforward_layernorm",
                  "llava": "mlp", "vit-gpt2": "mlp", "qwen2-vl": "mlp"}
GEMMA_SCOPE = {"hook_name": f"blocks.{LAYER}.hook_mlp_in", "hook_name_out": f"blocks.{LAYER}.hook_mlp_out",
               "model_name": "google/gemma-3-tiny", "hook_head_index": None,
               "hf_hook_name": f"model.layers.{LAYER}.pre_feedforward_layernorm.output",
               "hf_hook_name_out": f"model.layers.{LAYER}.post_feedforward_layernorm.output"}


def make_transcoder(d_in=64, d_out=64, metadata=GEMMA_SCOPE, seed=0) -> Transcoder:
    torch.manual_seed(seed)
    tc = Transcoder(d_in=d_in, d_sae=256, d_out=d_out, metadata=dict(metadata))
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.1)
        tc.b_dec.normal_(0, 0.1)
        tc.threshold.uniform_(0, 0.2)
    return tc.eval()


def decoder_layer(model):
    return vlmsae.layers(model).layers[LAYER]


@torch.no_grad()
def plain_run(model, inputs, replace=None):
    """(logits, mlp input, mlp output) with plain torch hooks; ``replace(x_in, y_out)`` may return a new output."""
    block, seen = decoder_layer(model), {}
    family = vlmsae.layers(model).family
    handles = [block.mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0]))]

    def out_hook(module, args, out):
        seen["out"] = out
        return None if replace is None else replace(seen["in"], out)

    handles.append(getattr(block, MLP_OUT_MODULE[family]).register_forward_hook(out_hook))
    try:
        out = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    return out, seen["in"], seen["out"]


@pytest.mark.parametrize("family", ["gemma3", "paligemma", "llava", "vit-gpt2", "qwen2-vl"])
def test_mlp_sites_capture_what_plain_hooks_on_the_layer_see(model, family):
    inputs = tiny_inputs(model, 2)
    _, want_in, want_out = plain_run(model, inputs)
    with torch.no_grad(), vlmsae.record(model, f"blocks.{LAYER}.hook_mlp_in") as rec_in, \
            vlmsae.record(model, [LAYER], site="mlp_out") as rec_out:
        model(**inputs)
    assert torch.equal(rec_in[LAYER], want_in)
    assert torch.equal(rec_out[LAYER], want_out)


@pytest.mark.parametrize("name, site", [("blocks.1.hook_mlp_in", "mlp_in"), ("blocks.1.mlp.hook_in", "mlp_in"),
                                        ("blocks.1.hook_mlp_out", "mlp_out")])
def test_mlp_hook_names(name, site):
    assert parse_site(name) == (1, site)
    assert parse_site(hook_name(1, site)) == (1, site)


@pytest.mark.parametrize("family", ["gemma3"])
def test_splice_with_error_term_reproduces_clean_logits(model, family):
    inputs = tiny_inputs(model, 2)
    clean = logits(model, inputs)
    tc = make_transcoder()
    with torch.no_grad(), vlmsae.splice(model, None, tc, use_error_term=True) as s:
        spliced = model(**inputs).logits
    assert torch.equal(spliced, clean)
    assert s.latents.shape == (*inputs["input_ids"].shape, 256) and s.latents.count_nonzero() > 0


@pytest.mark.parametrize("family", ["gemma3"])
def test_splice_replaces_the_mlp_output_by_the_prediction_from_its_input(model, family):
    """Without the error term the MLP's output is ``tc(mlp input)``: the logits of a plain-hook replacement."""
    inputs = tiny_inputs(model, 2)
    keep = inputs["attention_mask"].bool()  # a splice leaves padding alone
    tc = make_transcoder()
    want, _, _ = plain_run(model, inputs, lambda x, y: torch.where(keep[..., None], tc(x).recon, y))
    with torch.no_grad(), vlmsae.splice(model, LAYER, tc) as s:  # the site from its metadata: mlp_in -> mlp_out
        got = model(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - logits(model, inputs)).abs().max() > 1e-3
    with torch.no_grad(), vlmsae.splice(model, LAYER, tc, site="mlp_in") as s2:  # the site named: the same
        torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(s.latents, s2.latents)


@pytest.mark.parametrize("family", ["gemma3"])
def test_steering_a_transcoder_adds_its_decoder_rows_to_the_mlp_output(model, family):
    inputs = tiny_inputs(model, 2)
    tc = make_transcoder()
    keep = inputs["attention_mask"].bool()
    want, _, _ = plain_run(model, inputs, lambda x, y: y + keep[..., None] * 3.0 * tc.W_dec[7].detach())
    with torch.no_grad(), vlmsae.steer(model, None, tc, latents={7: 3.0}):
        torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-5, atol=1e-5)


def _ce(logits_, ids, positions):
    return F.cross_entropy(logits_[:, :-1][positions].float(), ids[:, 1:][positions], reduction="sum").item()


@pytest.mark.parametrize("family", ["gemma3"])
def test_evaluate_reports_ce_kl_fvu_l0_per_kind_for_a_transcoder(model, family):
    inputs = tiny_inputs(model, 2)
    tc = make_transcoder()
    table = vlmsae.evaluate(model, None, tc, [inputs])
    assert list(table.index) == ["all", "image", "text"]

    ids = inputs["input_ids"]
    kinds = vlmsae.layers(model).kinds(ids, inputs["attention_mask"])
    loss_at = (kinds[:, 1:] == Kind.TEXT) & (kinds[:, :-1] != Kind.PAD)  # predicting a text token
    n = loss_at.sum().item()
    clean, x_in, y_out = plain_run(model, inputs)
    with torch.no_grad():
        out = tc(x_in)
    for where, chosen in (("all", kinds != Kind.PAD), ("image", kinds == Kind.IMAGE), ("text", kinds == Kind.TEXT)):
        def spliced(x, y):
            return torch.where(chosen[..., None], tc(x).recon, y)
        row = table.loc[where]
        got = plain_run(model, inputs, spliced)[0]
        zero = plain_run(model, inputs, lambda x, y: torch.where(chosen[..., None], 0.0, y))[0]
        mean = plain_run(model, inputs, lambda x, y: torch.where(chosen[..., None], y[chosen].mean(0), y))[0]
        p, q = clean[:, :-1][loss_at].log_softmax(-1), got[:, :-1][loss_at].log_softmax(-1)
        expected = {"ce_clean": _ce(clean, ids, loss_at) / n, "ce_spliced": _ce(got, ids, loss_at) / n,
                    "ce_zero": _ce(zero, ids, loss_at) / n, "ce_mean": _ce(mean, ids, loss_at) / n,
                    "kl": (p.exp() * (p - q)).sum().item() / n}
        for column, value in expected.items():
            assert row[column] == pytest.approx(value, rel=1e-5, abs=1e-6), (where, column)
    row = table.loc["all"]
    for kind in ("image", "text"):
        at = kinds == getattr(Kind, kind.upper())
        y = y_out[at].double()
        fvu = (y - out.recon[at]).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        assert row[f"fvu_{kind}"] == pytest.approx(fvu.item(), rel=1e-5)
        assert row[f"l0_{kind}"] == pytest.approx((out.latents[at] != 0).sum(-1).double().mean().item(), rel=1e-6)
        assert row[f"spliced_tokens_{kind}"] == at.sum().item()


@pytest.mark.parametrize("family", ["gemma3"])
def test_wrong_widths_and_sites_are_typed_errors_that_change_nothing(model, family):
    inputs = tiny_inputs(model, 1)
    clean = logits(model, inputs)
    cases = [
        (make_transcoder(d_in=32), ConfigError, "d_in=32"),
        (make_transcoder(d_out=48), ConfigError, "d_out=48"),
        (make_transcoder(metadata={**GEMMA_SCOPE, "hook_name_out": "blocks.1.hook_attn_out"}), SiteError,
         "'blocks.1.hook_attn_out'"),
        (make_transcoder(metadata={**GEMMA_SCOPE, "hook_name_out": "blocks.2.hook_mlp_out"}), ConfigError,
         "cross-layer"),
        (make_transcoder(metadata={**GEMMA_SCOPE, "hook_name": "blocks.1.attn.hook_z"}), SiteError,
         "'blocks.1.attn.hook_z'"),
        (make_transcoder(metadata={}), ConfigError, "metadata['hook_name']"),
    ]
    for tc, error, says in cases:
        for enter in (lambda: vlmsae.splice(model, None, tc), lambda: vlmsae.ablate(model, None, tc, [0])):
            with pytest.raises(error, match=re.escape(says)):
                with enter():
                    pass
        with pytest.raises(error, match=re.escape(says)):
            vlmsae.evaluate(model, None, tc, [inputs])
    assert torch.equal(logits(model, inputs), clean)
    with pytest.raises(ConfigError, match="transcoder"):
        vlmsae.reconstruct(torch.zeros(1, 64), make_transcoder())
    with pytest.raises(ConfigError, match="transcoder"):
        vlmsae.SAETrainer(make_transcoder())


def test_config_refuses_what_a_transcoder_cannot_be():
    with pytest.raises(ConfigError, match="build it with vlmsae.Transcoder"):
        vlmsae.SAE(d_in=8, d_out=8, architecture="jumprelu", apply_b_dec_to_input=False)
    with pytest.raises(ConfigError, match="apply_b_dec_to_input=False"):
        Transcoder(d_in=8, d_out=8, apply_b_dec_to_input=True)
    with pytest.raises(ConfigError, match="architecture='topk' with d_out=8"):
        Transcoder(d_in=8, d_out=8, architecture="topk")
    with pytest.raises(ConfigError, match="needs d_out"):
        Transcoder(d_in=8)


def test_save_load_round_trip_in_saelens_transcoder_layout(tmp_path):
    tc = make_transcoder(d_in=64, d_out=48)
    tc.save(tmp_path / "tc")
    raw = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert (raw["architecture"], raw["d_in"], raw["d_out"], raw["apply_b_dec_to_input"]) == \
        ("jumprelu_transcoder", 64, 48, False)
    assert raw["metadata"]["hook_name_out"] == GEMMA_SCOPE["hook_name_out"]
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "tc" / "sae_weights.safetensors").items()}
    assert shapes == {"W_enc": (64, 256), "b_enc": (256,), "W_dec": (256, 48), "b_dec": (48,), "threshold": (256,)}
    for opened in (vlmsae.SAE.load(tmp_path / "tc"), Transcoder.load(tmp_path / "tc")):
        assert type(opened) is Transcoder and opened.cfg == tc.cfg
        x = torch.randn(5, 64)
        assert torch.equal(opened(x).recon, tc(x).recon) and opened(x).recon.shape == (5, 48)


@pytest.mark.parametrize("change, says", [
    (lambda cfg, w: cfg.pop("d_out"), "missing key 'd_out'"),
    (lambda cfg, w: cfg.update(d_out=47), r"key 'W_dec' has shape \[256, 48\], config says \[256, 47\]"),
    (lambda cfg, w: cfg.update(architecture="jumprelu_skip_transcoder"), "with a skip connection"),
    (lambda cfg, w: cfg.update(apply_b_dec_to_input=True), "pass apply_b_dec_to_input=False"),
    (lambda cfg, w: w.pop("threshold"), r"missing \['threshold'\]"),
    (lambda cfg, w: cfg.update(d_out="48"), "key 'd_out' = '48' has the wrong type"),
])
def test_corrupt_transcoder_folders_are_typed_errors(tmp_path, change, says):
    folder = tmp_path / "tc"
    make_transcoder(d_out=48).save(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    weights = load_file(folder / "sae_weights.safetensors")
    change(cfg, weights)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, folder / "sae_weights.safetensors")
    with pytest.raises(SAEFileError, match=says):
        vlmsae.SAE.load(folder)


def test_transcoder_load_refuses_an_sae_folder(tmp_path):
    vlmsae.SAE(d_in=8, d_sae=16, k=2).save(tmp_path / "sae")
    with pytest.raises(SAEFileError, match="not a transcoder; open it with vlmsae.SAE.load"):
        Transcoder.load(tmp_path / "sae")


def test_the_lens_splice_refuses_mlp_sites():
    """TransformerLens's own hook_mlp_in is the residual before the MLP's norm, not vlmsae's mlp_in."""
    pytest.importorskip("transformer_lens")
    from vlmsae.integrations import lens

    for layer, site in (("blocks.1.hook_mlp_in", "resid_post"), (1, "mlp_out")):
        with pytest.raises(SiteError, match="residual hook points only"):
            with lens.splice(object(), layer, make_transcoder(), site=site):
                pass
