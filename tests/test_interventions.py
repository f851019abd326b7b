"""splice / ablate / steer / evaluate on the running model, all five families."""

import pandas as pd
import pytest
import torch
from nnsight import NNsight

import vlmsae
from vlmsae import SAE, Kind
from vlmsae.evaluate import loss_positions, token_kl, token_losses
from vlmsae.zoo import tiny_inputs, tiny_model, with_sequences

from conftest import hook_snapshot, logits

LAYER = 1


def make_sae(d_in=64, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("d_sae", 256)
    kw.setdefault("k", 8)
    return SAE(d_in=d_in, **kw).eval()


def identity_sae(d_in=64):
    """Perfect reconstruction: relu(x) - relu(-x) = x, with d_sae = 2 d_in."""
    sae = SAE(d_in=d_in, d_sae=2 * d_in, kind="relu", apply_b_dec_to_input=False).eval()
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_splice_with_error_term_reproduces_clean_logits_and_generations(model):
    inputs = tiny_inputs(model, 2, padding="left")
    sae = make_sae()
    clean, clean_gen = logits(model, inputs), model.generate(**inputs, max_new_tokens=5, do_sample=False)
    with vlmsae.splice(model, LAYER, sae, error=True) as s:
        spliced = logits(model, inputs)
        assert s.latents.shape[-1] == 256 and ((s.latents != 0).sum(-1) <= 8).all()
        gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(spliced, clean, rtol=0, atol=1e-5)
    assert torch.equal(gen, clean_gen)
    # without the error term an untrained SAE really changes the model, at every decode step too
    with vlmsae.splice(model, LAYER, sae) as s:
        changed = logits(model, inputs)
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert s.latents.shape[1] == 1  # the last forward was a decode step
    assert (changed - clean).abs().amax() > 1e-3
    stats = s.stats()
    assert {"all", "text"} <= set(stats.index) and (stats["fvu"].dropna() > 0).all() and (stats["l0"] <= 8).all()


def test_splice_runs_the_sae_in_its_own_dtype():
    model = tiny_model("llava", dtype=torch.bfloat16)
    inputs = tiny_inputs(model, 2)
    sae = identity_sae()
    with torch.no_grad(), vlmsae.record(model, [LAYER + 1], site="resid_pre") as ref:
        model(**inputs)
    with vlmsae.splice(model, LAYER, sae), vlmsae.record(model, [LAYER + 1], site="resid_pre") as rec:
        logits(model, inputs)
    assert rec[LAYER + 1].dtype == torch.bfloat16
    torch.testing.assert_close(rec[LAYER + 1], ref[LAYER + 1], rtol=0, atol=0)  # fp32 identity is exact


def test_splice_restricted_to_kinds_leaves_other_positions(model):
    info = vlmsae.layers(model)
    inputs = tiny_inputs(model, 2)
    sae = make_sae()
    with torch.no_grad(), vlmsae.record(model, [LAYER]) as clean:
        model(**inputs)
    for where in ["text"] + (["image"] if info.has_image_tokens else []):
        with vlmsae.splice(model, LAYER, sae, where=where) as s, vlmsae.record(model, [LAYER]) as rec:
            logits(model, inputs)
        chosen = clean.mask(LAYER) == (Kind.TEXT if where == "text" else Kind.IMAGE)
        torch.testing.assert_close(rec[LAYER][~chosen], clean[LAYER][~chosen], rtol=0, atol=0)
        with torch.no_grad():
            recon = sae(clean[LAYER]).recon
        torch.testing.assert_close(rec[LAYER][chosen], recon[chosen], rtol=1e-5, atol=1e-6)
        assert set(s.stats().index) == {"all", where}


def test_ablate(model):
    inputs = tiny_inputs(model, 2)
    sae = make_sae()
    clean = logits(model, inputs)
    with vlmsae.ablate(model, LAYER, sae, []):
        torch.testing.assert_close(logits(model, inputs), clean, rtol=0, atol=0)
    with torch.no_grad(), vlmsae.record(model, [LAYER]) as ref:
        model(**inputs)
        latents = sae.encode(ref[LAYER])
    feature = int((latents != 0).flatten(0, 1).sum(0).argmax())  # the feature firing on most tokens
    with vlmsae.ablate(model, LAYER, sae, [feature]), vlmsae.record(model, [LAYER]) as rec:
        ablated = logits(model, inputs)
    nonpad = (ref.mask(LAYER) != Kind.PAD)[..., None]  # where=None: every position but padding
    expected = -latents[..., feature, None] * sae.W_dec[feature].detach() * nonpad
    torch.testing.assert_close(rec[LAYER] - ref[LAYER], expected, rtol=1e-4, atol=1e-5)
    assert (ablated - clean).abs().amax() > 0
    means = torch.rand(sae.cfg.d_sae)
    with vlmsae.ablate(model, LAYER, sae, [feature], mode="mean", means=means), \
            vlmsae.record(model, [LAYER]) as rec:
        logits(model, inputs)
    expected = (means[feature] - latents[..., feature, None]) * sae.W_dec[feature].detach() * nonpad
    torch.testing.assert_close(rec[LAYER] - ref[LAYER], expected, rtol=1e-4, atol=1e-5)


def test_steer_acts_at_every_decode_step(model):
    info = vlmsae.layers(model)
    inputs = tiny_inputs(model, 2, padding="left")
    sae = make_sae()
    prompt = inputs[info.ids_key].shape[1]
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    clean = model.generate(**inputs, **gen)
    # hooks run in the order attached: `raw` sees the layer's own output, `out` the steered one
    with vlmsae.record(model, [LAYER]) as raw, \
            vlmsae.steer(model, LAYER, sae, features={3: 40.0, 7: -20.0}, where="generated") as vector, \
            vlmsae.record(model, [LAYER]) as out:
        steered = model.generate(**inputs, **gen)
    torch.testing.assert_close(vector, 40.0 * sae.W_dec[3].detach() - 20.0 * sae.W_dec[7].detach())
    assert [s.shape[1] for s in out.steps(LAYER)] == [prompt] + [1] * 5  # fired at every decode step
    added = out[LAYER] - raw[LAYER]
    assert torch.equal(added[:, :prompt], torch.zeros_like(added[:, :prompt]))  # the prompt is untouched
    torch.testing.assert_close(added[:, prompt:], vector.expand(2, 5, -1), rtol=1e-5, atol=1e-5)
    assert torch.equal(steered[:, :prompt + 1], clean[:, :prompt + 1])  # the first new token comes from the prompt
    assert not torch.equal(steered[:, prompt + 1:], clean[:, prompt + 1:])


def test_steer_with_raw_direction_and_relative_strength(model):
    info = vlmsae.layers(model)
    inputs = tiny_inputs(model, 2)
    sae = make_sae()
    v = torch.randn(info.d_model)
    with torch.no_grad(), vlmsae.record(model, [LAYER]) as ref:
        model(**inputs)
    with vlmsae.steer(model, LAYER, v, strength=3.0), vlmsae.record(model, [LAYER]) as rec:
        logits(model, inputs)
    nonpad = ref.mask(LAYER) != Kind.PAD
    torch.testing.assert_close((rec[LAYER] - ref[LAYER])[nonpad], (3.0 * v).expand(int(nonpad.sum()), -1),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(rec[LAYER][~nonpad], ref[LAYER][~nonpad])
    typical = vlmsae.latent_stats(model, LAYER, sae, [inputs]).mean_firing
    with vlmsae.steer(model, LAYER, sae, {5: 2.0}, relative_to=typical) as vector:
        pass
    torch.testing.assert_close(vector, 2.0 * typical[5].float() * sae.W_dec[5].detach())


def test_nnsight_trace_with_reconstruct_matches_splice():
    model = tiny_model("llava")  # NNsight patches every module: its own model
    inputs = tiny_inputs(model, 2)
    sae = make_sae()
    with vlmsae.splice(model, LAYER, sae):
        ours = logits(model, inputs)
    wrapped = NNsight(model)
    nonpad = vlmsae.layers(model).kinds(inputs["input_ids"], inputs["attention_mask"]) != Kind.PAD
    with torch.no_grad(), wrapped.trace(**inputs):
        layer = wrapped.model.language_model.layers[LAYER]
        layer.output = vlmsae.reconstruct(layer.output, sae, mask=nonpad)
        theirs = wrapped.output.logits.save()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    assert (ours - logits(model, inputs)).abs().amax() > 1e-3


def test_nested_and_repeated_contexts(model):
    inputs = tiny_inputs(model, 2)
    sae = make_sae()
    before = hook_snapshot(model)
    v = torch.randn(64)
    with vlmsae.splice(model, LAYER, sae):
        spliced = logits(model, inputs)
    with vlmsae.steer(model, LAYER, v), vlmsae.splice(model, LAYER, sae):  # outer acts first
        with pytest.raises(vlmsae.SiteError, match="already spliced at layer 1"):
            with vlmsae.splice(model, LAYER, sae):
                pass
        with vlmsae.record(model, [LAYER]) as rec:
            logits(model, inputs)
    with vlmsae.steer(model, LAYER, v), vlmsae.record(model, [LAYER]) as steered:
        logits(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(rec[LAYER], sae(steered[LAYER]).recon.where(
            (steered.mask(LAYER) != Kind.PAD)[..., None], steered[LAYER]), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="boom"), vlmsae.splice(model, LAYER, sae):
        raise RuntimeError("boom")
    with vlmsae.splice(model, LAYER, sae):  # the same splice works again after the exception
        torch.testing.assert_close(logits(model, inputs), spliced, rtol=0, atol=0)
    assert hook_snapshot(model) == before


def test_bad_input_errors_before_anything_is_attached(model):
    info = vlmsae.layers(model)
    before = hook_snapshot(model)
    sae = make_sae()
    with pytest.raises(vlmsae.ConfigError, match="d_in=32.*d_model=64"):
        with vlmsae.splice(model, LAYER, make_sae(d_in=32)):
            pass
    with pytest.raises(vlmsae.ConfigError, match="feature index 256 is out of range.*0..255"):
        with vlmsae.ablate(model, LAYER, sae, [1, 256]):
            pass
    with pytest.raises(vlmsae.ConfigError, match="feature index -1"):
        with vlmsae.steer(model, LAYER, sae, {-1: 2.0}):
            pass
    with pytest.raises(vlmsae.LayerIndexError, match="layer=9"):
        with vlmsae.steer(model, 9, sae, {1: 2.0}):
            pass
    with pytest.raises(vlmsae.ConfigError, match="where=\\[\\] selects no token"):
        with vlmsae.splice(model, LAYER, sae, where=[]):
            pass
    with pytest.raises(vlmsae.ConfigError, match="where='pixels'"):
        with vlmsae.splice(model, LAYER, sae, where="pixels"):
            pass
    if not info.has_image_tokens:
        with pytest.raises(vlmsae.ConfigError, match="where='image' selects no token in a vit-gpt2 model"):
            with vlmsae.steer(model, LAYER, sae, {1: 1.0}, where="image"):
                pass
    with pytest.raises(vlmsae.ConfigError, match="mode='mean' needs means="):
        with vlmsae.ablate(model, LAYER, sae, [1], mode="mean"):
            pass
    assert hook_snapshot(model) == before


def reference_evaluate(model, sae, batches, where_kind):
    """A straightforward per-batch computation, for comparison."""
    info = vlmsae.layers(model)
    tot = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0, "n": 0}
    for batch in batches:
        ids = batch[info.ids_key]
        with torch.no_grad(), vlmsae.record(model, [LAYER]) as rec:
            clean = model(**batch).logits
        kinds = rec.mask(LAYER)
        sel = (kinds != Kind.PAD) if where_kind is None else (kinds == where_kind)
        resid = rec[LAYER]
        with torch.no_grad():
            recon = torch.where(sel[..., None], sae(resid).recon, resid)
            zero = torch.where(sel[..., None], torch.zeros_like(resid), resid)
        outs = {}
        for name, value in (("spliced", recon), ("zero", zero)):
            with torch.no_grad(), vlmsae.attach(model, {(LAYER, "resid_post"): lambda r, f, value=value: value}):
                outs[name] = model(**batch).logits
        pos = loss_positions(kinds)
        tot["clean"] += token_losses(clean, ids)[pos].sum().item()
        tot["spliced"] += token_losses(outs["spliced"], ids)[pos].sum().item()
        tot["zero"] += token_losses(outs["zero"], ids)[pos].sum().item()
        tot["kl"] += token_kl(clean, outs["spliced"])[pos].sum().item()
        tot["n"] += pos.sum().item()
    ce = {k: tot[k] / tot["n"] for k in ("clean", "spliced", "zero")}
    return ce, (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"]), tot["kl"] / tot["n"]


def own_text(model, seed):
    """A prompt continued by the model's own greedy tokens: text the random model predicts well."""
    inputs = tiny_inputs(model, 3, seed=seed, padding="left", text_len=2)
    return with_sequences(model, inputs, model.generate(**inputs, max_new_tokens=8, min_new_tokens=8,
                                                         do_sample=False))


def test_evaluate(model):
    info = vlmsae.layers(model)
    batches = [own_text(model, seed) for seed in range(2)]
    perfect = vlmsae.evaluate(model, LAYER, identity_sae(), batches)
    assert isinstance(perfect, pd.DataFrame)
    assert list(perfect.index) == (["all", "image", "text"] if info.has_image_tokens else ["all"])
    for row in perfect.itertuples():
        assert row.loss_recovered == pytest.approx(1.0, abs=1e-5)
        assert abs(row.kl) < 1e-6 and row.fvu < 1e-10
    untrained = vlmsae.evaluate(model, LAYER, make_sae(), batches)
    assert (untrained["ce_zero"] > untrained["ce_clean"]).all()
    assert untrained.loc["all", "loss_recovered"] < 0.8 and (untrained["loss_recovered"] < 1).all()
    assert (untrained["kl"] > 0).all()
    assert (untrained["fvu"] > 0.1).all() and (untrained["l0"] <= 8).all()
    for where in untrained.index:
        kind = {"all": None, "text": Kind.TEXT, "image": Kind.IMAGE}[where]
        ce, recovered, kl = reference_evaluate(model, make_sae(), batches, kind)
        row = untrained.loc[where]
        assert row.ce_clean == pytest.approx(ce["clean"], rel=1e-5)
        assert row.ce_spliced == pytest.approx(ce["spliced"], rel=1e-5)
        assert row.ce_zero == pytest.approx(ce["zero"], rel=1e-5)
        assert row.loss_recovered == pytest.approx(recovered, rel=1e-4, abs=1e-5)
        assert row.kl == pytest.approx(kl, rel=1e-4, abs=1e-7)
    if info.has_image_tokens:
        assert untrained.loc["all", "spliced_tokens_image"] == untrained.loc["image", "spliced_tokens"]
