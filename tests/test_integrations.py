"""vlmsae.integrations (issue 12, item 6): splice / ablate / steer inside an nnsight trace give the hook path's logits
(vlmsae.splice / ablate / steer on the plain model), a vlmsae SAE spliced on a TransformerBridge gives vlmsae.splice's,
TransformerLens's hook names are the tensors vlmsae.sites says they are, and a missing extra says what to install.

The references are the hook path on the same model and inputs, run by vlmsae's own hooks, not by nnsight or the bridge.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

import vlmsae
from vlmsae.errors import MissingExtraError
from vlmsae.sites import LENS_HOOKS, parse_site
from vlmsae.zoo import FAMILIES, tiny_inputs, tiny_model

NEW_TOKENS = 4


def _sae(d_model: int, seed: int = 0) -> vlmsae.SAE:
    torch.manual_seed(seed)
    sae = vlmsae.SAE(d_in=d_model, d_sae=4 * d_model, k=8)
    with torch.no_grad():  # a random SAE reconstructs poorly: the splice must visibly change the logits
        sae.b_enc.add_(0.1)
    return sae


# --------------------------------------------------------------------------- nnsight


@pytest.fixture(scope="module", params=FAMILIES)
def traced(request):
    nnsight = pytest.importorskip("nnsight")
    from vlmsae.integrations import nnsight as vn

    model = tiny_model(request.param)  # nnsight installs itself on every submodule: a model for this module alone
    info = vlmsae.layers(model)
    return SimpleNamespace(family=request.param, model=model, wrapped=nnsight.NNsight(model), vn=vn, info=info,
                           layer=info.n_layers // 2, sae=_sae(info.d_model))


def _cases(t):
    """(name, hook-path context, nnsight call) pairs: the same intervention spelled both ways."""
    image = "image" if t.info.has_image_tokens else "text"
    means = torch.rand(t.sae.cfg.d_sae, generator=torch.Generator().manual_seed(3))
    L, sae = t.layer, t.sae
    return [
        ("splice", lambda: vlmsae.splice(t.model, L, sae), lambda w: t.vn.splice(w, L, sae)),
        (f"splice error where={image}", lambda: vlmsae.splice(t.model, L, sae, use_error_term=True, where=image,
                                                              edit=lambda z, fwd: z * 2),
         lambda w: t.vn.splice(w, L, sae, use_error_term=True, where=image, edit=lambda z, fwd: z * 2)),
        ("splice resid_pre", lambda: vlmsae.splice(t.model, L, sae, site="resid_pre"),
         lambda w: t.vn.splice(w, f"blocks.{L}.hook_resid_pre", sae)),
        ("ablate mean", lambda: vlmsae.ablate(t.model, L, sae, range(0, sae.cfg.d_sae, 2), mode="mean", means=means),
         lambda w: t.vn.ablate(w, L, sae, range(0, sae.cfg.d_sae, 2), mode="mean", means=means)),
        ("steer text", lambda: vlmsae.steer(t.model, L, sae, {1: 6.0, 5: -3.0}, where="text"),
         lambda w: t.vn.steer(w, L, sae, {1: 6.0, 5: -3.0}, where="text")),
    ]


def test_nnsight_interventions_match_the_hook_path(traced):
    """Each intervention inside an nnsight trace gives bit-equal logits to the same one through vlmsae's hooks."""
    t = traced
    inputs = tiny_inputs(t.model, 2, padding="left")
    with torch.no_grad():
        clean = t.model(**inputs).logits
        for name, ours, theirs in _cases(t):
            with ours():
                expected = t.model(**inputs).logits
            with t.wrapped.trace(**inputs):
                theirs(t.wrapped)
                got = t.wrapped.output.logits.save()
            assert (expected - clean).abs().max() > 1e-3, f"{t.family} {name}: the intervention changed nothing"
            assert torch.equal(got, expected), f"{t.family} {name}: max diff {(got - expected).abs().max():.3g}"


def test_nnsight_splice_returns_the_latents(traced):
    t = traced
    inputs = tiny_inputs(t.model, 2)
    with torch.no_grad():
        with vlmsae.splice(t.model, t.layer, t.sae) as s:
            t.model(**inputs)
        with t.wrapped.trace(**inputs):
            latents = t.vn.splice(t.wrapped, t.layer, t.sae).save()
    assert torch.equal(latents, s.latents)


@pytest.mark.parametrize("where", ["generated", None])
def test_nnsight_steer_and_splice_under_generate_match_the_hook_path(traced, where):
    """At every decode step of greedy generate(): per-step logits and tokens equal the hook path's."""
    t = traced
    inputs = tiny_inputs(t.model, 2, padding="left")
    gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
               return_dict_in_generate=True)
    latents = {1: 6.0, 5: -3.0}
    with torch.no_grad():
        clean = t.model.generate(**inputs, **gen)
        with vlmsae.steer(t.model, t.layer - 1, t.sae, latents, where=where), \
                vlmsae.splice(t.model, t.layer, t.sae, use_error_term=True, where=where, edit=lambda z, fwd: z * 2):
            ours = t.model.generate(**inputs, **gen)
        with t.wrapped.trace(**inputs, **gen, fn=t.model.generate) as tracer:
            for _ in tracer.iter[0:NEW_TOKENS]:  # bounded: code after an open-ended iter[:] never runs (DESIGN.md)
                fwd = t.vn.forward(t.wrapped)  # one read of this step's inputs, for both calls
                t.vn.steer(t.wrapped, t.layer - 1, t.sae, latents, where=where, fwd=fwd)
                t.vn.splice(t.wrapped, t.layer, t.sae, use_error_term=True, where=where, edit=lambda z, fwd: z * 2, fwd=fwd)
            theirs = tracer.result.save()
    assert len(ours.logits) == len(theirs.logits) == NEW_TOKENS
    changed = [(a - b).abs().max() > 1e-3 for a, b in zip(ours.logits, clean.logits)]
    assert changed[-1] and changed[0] == (where is None), f"{t.family}: steps changed {changed}"
    for step, (a, b) in enumerate(zip(ours.logits, theirs.logits)):
        assert torch.equal(a, b), f"{t.family} decode step {step}: max diff {(a - b).abs().max():.3g}"
    assert torch.equal(ours.sequences, theirs.sequences)


def test_nnsight_refuses_the_plain_model(traced):
    t = traced
    with pytest.raises(vlmsae.UnsupportedModelError, match=r"nnsight\.NNsight\(model\)"):
        t.vn.splice(t.model, t.layer, t.sae)


# --------------------------------------------------------------------------- TransformerLens bridge


@pytest.fixture(scope="module")
def bridged():
    pytest.importorskip("transformer_lens")
    from test_peers import _offline_tokenizer, _sealed
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources.transformers import helpers

    from vlmsae.integrations import lens

    model = tiny_model("llava")
    with _sealed([], helpers):
        bridge = TransformerBridge.boot_transformers(
            "vlmsae-zoo/tiny-llava", hf_model=model,
            tokenizer=_offline_tokenizer(model.config.get_text_config().vocab_size), device="cpu",
            hf_config_overrides={"architectures": ["LlavaForConditionalGeneration"]})
    info = vlmsae.layers(model)
    inputs = tiny_inputs(model, 2, padding="left")
    return SimpleNamespace(model=model, bridge=bridge, lens=lens, info=info, inputs=inputs, layer=info.n_layers // 2,
                           sae=_sae(info.d_model), not_pad=info.kinds(inputs["input_ids"], inputs["attention_mask"]) != 0)


def _bridge_logits(b):
    i = b.inputs
    return b.bridge(i["input_ids"], attention_mask=i["attention_mask"], pixel_values=i["pixel_values"])


# A name vlmsae reads from SAE files that the bridge's cache does not hold: Gemma Scope 2's hook_mlp_in (the MLP's
# input after its norm; the bridge's own hook_mlp_in is the residual before that norm, fired only on request).
FILE_ONLY_HOOKS = {"hook_mlp_in"}


def test_lens_hook_names_are_the_sites_vlmsae_parses(bridged):
    """Every spelling of a block's residual and MLP hook points in the bridge's cache is the tensor vlmsae records at
    the (layer, site) that parse_site gives for it."""
    b = bridged
    i = b.inputs
    n = b.info.n_layers
    with torch.no_grad(), vlmsae.record(b.model, range(n), site="resid_pre") as pre, \
            vlmsae.record(b.model, range(n), site="resid_post") as post, \
            vlmsae.record(b.model, range(n), site="mlp_in") as mlp_in, \
            vlmsae.record(b.model, range(n), site="mlp_out") as mlp_out:
        _, cache = b.bridge.run_with_cache(i["input_ids"], attention_mask=i["attention_mask"],
                                           pixel_values=i["pixel_values"])
    recorded = {"resid_pre": pre, "resid_post": post, "mlp_in": mlp_in, "mlp_out": mlp_out}
    for layer in range(n):
        assert {p for p in LENS_HOOKS if f"blocks.{layer}.{p}" not in cache} == FILE_ONLY_HOOKS
        for point in set(LENS_HOOKS) - FILE_ONLY_HOOKS:
            index, site = parse_site(f"blocks.{layer}.{point}")
            torch.testing.assert_close(cache[f"blocks.{layer}.{point}"], recorded[site][index], rtol=0, atol=1e-6,
                                       msg=f"blocks.{layer}.{point}")


def test_lens_splice_matches_vlmsae_splice(bridged):
    """lens.splice on the bridge and vlmsae.splice on the wrapped model give the same logits and latents."""
    b = bridged
    torch.manual_seed(0)
    with torch.no_grad():
        clean = b.model(**b.inputs).logits
        with vlmsae.splice(b.model, b.layer, b.sae) as ours:
            expected = b.model(**b.inputs).logits
        with b.lens.splice(b.bridge, f"blocks.{b.layer}.hook_resid_post", b.sae, mask=b.not_pad) as theirs:
            got = _bridge_logits(b)
        with vlmsae.ablate(b.model, b.layer, b.sae, [1, 2, 3], where="image"):
            ablated = b.model(**b.inputs).logits

        def zero(latents):
            latents = latents.clone()
            latents[..., [1, 2, 3]] = 0
            return latents

        image = b.info.kinds(b.inputs["input_ids"], b.inputs["attention_mask"]) == vlmsae.Kind.IMAGE
        with b.lens.splice(b.bridge, b.layer, b.sae, use_error_term=True, edit=zero, mask=image):
            got_ablated = _bridge_logits(b)
        after = _bridge_logits(b)
    assert theirs.name == f"blocks.{b.layer}.hook_resid_post"
    assert (expected - clean).abs().max() > 1e-2 and (ablated - clean).abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs.latents, ours.latents, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_ablated, ablated, rtol=0, atol=1e-5)
    torch.testing.assert_close(after, clean, rtol=0, atol=1e-5)  # the hook is gone


def test_lens_splice_refuses_what_does_not_fit(bridged):
    b = bridged
    with pytest.raises(vlmsae.UnsupportedModelError, match="TransformerBridge"):
        with b.lens.splice(b.model, b.layer, b.sae):
            pass
    with pytest.raises(vlmsae.ConfigError, match=f"d_model={b.info.d_model}"):
        with b.lens.splice(b.bridge, b.layer, vlmsae.SAE(d_in=b.info.d_model + 1, d_sae=8, k=2)):
            pass
    with pytest.warns(vlmsae.errors.HookNameWarning, match="blocks.0.hook_out"):
        sae = _sae(b.info.d_model)
        sae.metadata["hook_name"] = "blocks.0.hook_out"
        with b.lens.splice(b.bridge, 1, sae):
            pass


# --------------------------------------------------------------------------- missing extras


@pytest.mark.parametrize("peer, extra", [("nnsight", "nnsight"), ("transformer_lens", "lens")])
def test_a_missing_extra_names_its_pip_install(monkeypatch, peer, extra):
    """With the peer library absent (None in sys.modules makes its import fail), the call says what to install."""
    from vlmsae.integrations import lens
    from vlmsae.integrations import nnsight as vn

    monkeypatch.setitem(sys.modules, peer, None)
    model = tiny_model("llava", n_layers=2)
    sae = vlmsae.SAE(d_in=vlmsae.layers(model).d_model, d_sae=8, k=2)
    with pytest.raises(ImportError, match=f'pip install "vlmsae\\[{extra}\\]"') as caught:
        if peer == "nnsight":
            vn.splice(model, 0, sae)
        else:
            with lens.splice(model, 0, sae):
                pass
    assert isinstance(caught.value, MissingExtraError)
