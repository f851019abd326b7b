"""splice / ablate / steer / evaluate on the running model, all five families."""

from contextlib import contextmanager

import pandas as pd
import pytest
import torch
from nnsight import NNsight

import vlmsae
from vlmsae import SAE, Kind, zoo
from vlmsae.zoo import family_of_config, tiny_inputs, tiny_model, with_sequences

from conftest import hook_snapshot, logits, topk_by_hand

LAYER = 1


def make_sae(d_in=64, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("d_sae", 256)
    kw.setdefault("k", 8)
    return SAE(d_in=d_in, **kw).eval()


def identity_sae(d_in=64):
    """Perfect reconstruction: relu(x) - relu(-x) = x, with d_sae = 2 d_in."""
    sae = SAE(d_in=d_in, d_sae=2 * d_in, architecture="relu", apply_b_dec_to_input=False).eval()
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# Where transformers keeps each zoo family's decoder layers: the reference below hooks them itself.
DECODER_LAYERS = {"vit-gpt2": "decoder.transformer.h", "llava": "model.language_model.layers",
                  "qwen2-vl": "model.language_model.layers", "qwen2.5-vl": "model.language_model.layers",
                  "qwen3-vl": "model.language_model.layers", "gemma3": "model.language_model.layers",
                  "paligemma": "model.language_model.layers", "idefics3": "model.text_model.layers",
                  "smolvlm": "model.text_model.layers"}


def id_keys(inputs):
    """The keywords of the decoder's token ids and attention mask in a zoo model's inputs."""
    if "decoder_input_ids" in inputs:
        return "decoder_input_ids", "decoder_attention_mask"
    return "input_ids", "attention_mask"


@contextmanager
def replace_layer_output(model, layer, fn):
    """A plain PyTorch forward hook on decoder layer ``layer``: its output residual r -> fn(r)."""
    module = model.get_submodule(DECODER_LAYERS[family_of_config(model.config)])[layer]

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_splice_with_error_term_reproduces_clean_logits_and_generations(model):
    inputs = tiny_inputs(model, 2, padding="left")
    sae = make_sae()
    clean, clean_gen = logits(model, inputs), model.generate(**inputs, max_new_tokens=5, do_sample=False)
    with vlmsae.splice(model, LAYER, sae, use_error_term=True) as s:
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
        chosen = clean.kinds(LAYER) == (Kind.TEXT if where == "text" else Kind.IMAGE)
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
    nonpad = (ref.kinds(LAYER) != Kind.PAD)[..., None]  # where=None: every position but padding
    expected = -latents[..., feature, None] * sae.W_dec[feature].detach() * nonpad
    torch.testing.assert_close(rec[LAYER] - ref[LAYER], expected, rtol=1e-4, atol=1e-5)
    assert (ablated - clean).abs().amax() > 0
    means = torch.rand(sae.cfg.d_sae)
    with vlmsae.ablate(model, LAYER, sae, [feature], mode="mean", means=means), \
            vlmsae.record(model, [LAYER]) as rec:
        logits(model, inputs)
    expected = (means[feature] - latents[..., feature, None]) * sae.W_dec[feature].detach() * nonpad
    torch.testing.assert_close(rec[LAYER] - ref[LAYER], expected, rtol=1e-4, atol=1e-5)


def clean_residual(model, inputs):
    """The output of decoder layer LAYER in a clean forward, read by a plain PyTorch hook."""
    captured = []
    with torch.no_grad(), replace_layer_output(model, LAYER, lambda r: captured.append(r) or r):
        model(**inputs)
    return captured[0]


def spliced_residual(model, inputs, **splice):
    """The output of decoder layer LAYER as the rest of the model sees it, inside ``vlmsae.splice``."""
    captured = []
    with vlmsae.splice(model, LAYER, **splice), torch.no_grad(), \
            replace_layer_output(model, LAYER, lambda r: captured.append(r) or r):
        model(**inputs)
    return captured[0]


def test_splice_with_an_edit_moves_the_residual_by_the_decoded_change(model):
    """error=True puts back x + decode(edited) - decode(latents); error=False puts back decode(edited)."""
    inputs = tiny_inputs(model, 2)
    sae = make_sae()
    with torch.no_grad():  # a trained-looking SAE: b_dec and the input scale are not their defaults
        sae.b_dec.normal_(0, 0.5)
        sae.act_scale.fill_(0.5)

    def edit(latents, fwd):
        edited = latents.clone()
        edited[..., :128] *= 3.0  # strengthen half the features wherever they fire
        edited[..., 5] = 2.0  # and turn one on everywhere
        return edited

    x = clean_residual(model, inputs)
    with torch.no_grad():
        recon, latents = topk_by_hand(sae, x)
        decoded_edit = (edit(latents, None) @ sae.W_dec + sae.b_dec) / sae.act_scale
    real = inputs[id_keys(inputs)[1]].bool()[..., None]  # every position but padding
    with_error = spliced_residual(model, inputs, sae=sae, use_error_term=True, edit=edit)
    torch.testing.assert_close(with_error, torch.where(real, x + decoded_edit - recon, x), rtol=1e-5, atol=1e-5)
    without = spliced_residual(model, inputs, sae=sae, edit=edit)
    torch.testing.assert_close(without, torch.where(real, decoded_edit, x), rtol=1e-5, atol=1e-5)
    assert (with_error - x)[real.expand_as(x)].abs().amax() > 0.1  # the edit really moved the residual


def test_identity_edit_with_error_term_reproduces_clean_logits(model):
    """An edit that changes nothing (a copy of the latents) still goes through x + decode(edited) - decode(latents)."""
    inputs = tiny_inputs(model, 2, padding="left")
    sae = make_sae()
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.5)
    clean = logits(model, inputs)
    copies = []

    def copy(latents, fwd):
        copies.append(latents)
        return latents.clone()

    with vlmsae.splice(model, LAYER, sae, use_error_term=True, edit=copy):
        spliced = logits(model, inputs)
    assert len(copies) == 1  # the edit ran, on this forward
    torch.testing.assert_close(spliced, clean, rtol=0, atol=1e-5)
    with vlmsae.splice(model, LAYER, sae, edit=copy):  # without the error term the same edit changes the model
        assert (logits(model, inputs) - clean).abs().amax() > 1e-3



def test_every_form_of_where_selects_the_same_positions(model):
    """A kind name, a Kind, a list, and a callable on the forward: each splices exactly the positions it names."""
    info = vlmsae.layers(model)
    inputs = tiny_inputs(model, 2)
    sae = make_sae()
    ids_key, mask_key = id_keys(inputs)
    ids, real = inputs[ids_key], inputs[mask_key].bool()
    x = clean_residual(model, inputs)
    with torch.no_grad():
        recon, _ = topk_by_hand(sae, x)
    text = real & (ids >= zoo.FIRST_TEXT_ID)
    # the family's tokenizer names every special token of the prompt (Idefics3's image wrapping is known to no config)
    special = vlmsae.special_token_ids(model, zoo.tokenizer(model))
    cases = [("text", text), (Kind.TEXT, text), (["text"], text),
             (lambda fwd: fwd.ids >= zoo.FIRST_TEXT_ID, text), (lambda fwd: fwd.ids == zoo.BOS, ids == zoo.BOS)]
    if info.has_image_tokens:
        cases.append(([Kind.IMAGE, "text"], text | (real & (ids == zoo.IMAGE))))
    for where, chosen in cases:
        got = spliced_residual(model, inputs, sae=sae, where=where, special_ids=special)
        torch.testing.assert_close(got, torch.where(chosen[..., None], recon, x), rtol=1e-5, atol=1e-5, msg=str(where))



def test_splice_stats_hold_under_a_large_common_offset(model):
    """FVU is read from running sums (sum x, sum ||x||^2): with residuals far from the origin, as real models'
    are, the variance is a small difference of large sums and must still come out right."""
    inputs = tiny_inputs(model, 2)
    sae = make_sae()
    torch.manual_seed(1)
    offset = 300 * torch.nn.functional.normalize(torch.randn(64), dim=0)
    real = inputs[id_keys(inputs)[1]].bool()
    x = torch.where(real[..., None], clean_residual(model, inputs) + offset, clean_residual(model, inputs))
    with vlmsae.steer(model, LAYER, offset), vlmsae.splice(model, LAYER, sae) as s:  # the outer one acts first
        assert s.latents is None  # nothing has run yet
        logits(model, inputs)
    with torch.no_grad():
        recon, latents = topk_by_hand(sae, x)
    x, recon, latents = x[real].double(), recon[real].double(), latents[real]
    stats = s.stats().loc["all"]
    fvu = ((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert stats["fvu"] == pytest.approx(fvu, rel=1e-6)
    assert stats["l0"] == pytest.approx((latents != 0).sum(-1).double().mean().item())
    assert stats["tokens"] == int(real.sum())

def test_reconstruct_puts_back_what_a_splice_would():
    """reconstruct() (for nnsight traces) on a residual of its own: error term, edit, mask and dtype."""
    sae = make_sae()
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.5)
        sae.act_scale.fill_(0.5)
    x = torch.randn(2, 5, 64)
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])

    def edit(latents):
        return latents * 2

    with torch.no_grad():
        recon, latents = topk_by_hand(sae, x)
        decoded_edit = (2 * latents @ sae.W_dec + sae.b_dec) / sae.act_scale
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vlmsae.reconstruct(x, sae), recon, **close)
    torch.testing.assert_close(vlmsae.reconstruct(x, sae, edit=edit), decoded_edit, **close)
    torch.testing.assert_close(vlmsae.reconstruct(x, sae, use_error_term=True, edit=edit), x + decoded_edit - recon, **close)
    torch.testing.assert_close(vlmsae.reconstruct(x, sae, use_error_term=True, edit=edit, mask=mask),
                               torch.where(mask[..., None], x + decoded_edit - recon, x), **close)
    half = vlmsae.reconstruct(x.bfloat16(), sae, mask=mask)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, torch.where(mask[..., None], recon, x).bfloat16(), rtol=2e-2, atol=2e-2)


def test_splice_stats_by_kind_from_running_sums():
    """FVU and L0 per kind from the sums a splice keeps; a kind with no variance (all alike) has no FVU."""
    from vlmsae.interventions import SpliceStats, kind_stats

    n = len(Kind)
    x = {Kind.IMAGE: torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64),
         Kind.TEXT: torch.tensor([[0.3, -0.7]] * 4, dtype=torch.float64),  # all alike
         # all alike with a large norm, as BOS is in real models: rounding leaves a variance of ~5e-10 in the sums
         Kind.SPECIAL: torch.tensor([[123.456, 789.012]] * 5, dtype=torch.float64),
         Kind.GENERATED: torch.zeros(2, 2, dtype=torch.float64)}  # all alike and zero
    squared_error = {Kind.IMAGE: 0.5, Kind.TEXT: 0.25, Kind.SPECIAL: 1.0, Kind.GENERATED: 0.125}
    l0 = {Kind.IMAGE: 9.0, Kind.TEXT: 8.0, Kind.SPECIAL: 5.0, Kind.GENERATED: 2.0}
    fired = {Kind.IMAGE: [2.0, 0.0, 1.0], Kind.TEXT: [0.0, 0.0, 4.0]}  # latent 1 never fires; nothing on the rest
    sums = SpliceStats(*(torch.zeros(n, *shape, dtype=torch.float64) for shape in ((), (), (2,), (), (), (3,))))
    for kind, counts in fired.items():
        sums.fired[kind] = torch.tensor(counts)
    for kind, rows in x.items():
        sums.tokens[kind] = len(rows)
        sums.squared_error[kind] = squared_error[kind]
        sums.sum_x[kind] = rows.sum(0)
        sums.sum_sq_x[kind] = rows.pow(2).sum()
        sums.l0[kind] = l0[kind]
    table = kind_stats(sums)
    assert list(table.index) == ["all", "special", "image", "text", "generated"]
    assert table.loc["image", "fvu"] == pytest.approx(0.5 / (4 / 3))  # sum ||x - mean||^2 = 5/9 + 5/9 + 2/9
    assert table[["fvu"]].loc[["special", "text", "generated"]].isna().all().all()
    # dead: fired on none of the row's tokens
    assert table["dead"].to_dict() == {"all": 1 / 3, "special": 1.0, "image": 1 / 3, "text": 2 / 3, "generated": 1.0}
    every = torch.cat(list(x.values()))
    variance = (every - every.mean(0)).pow(2).sum().item()
    assert table.loc["all", "fvu"] == pytest.approx(1.875 / variance)
    assert table.loc["all", "l0"] == pytest.approx(24 / 14) and table.loc["image", "l0"] == pytest.approx(3.0)
    assert table["tokens"].to_dict() == {"all": 14, "special": 5, "image": 3, "text": 4, "generated": 2}

def test_steer_acts_at_every_decode_step(model):
    info = vlmsae.layers(model)
    inputs = tiny_inputs(model, 2, padding="left")
    sae = make_sae()
    prompt = inputs[info.ids_key].shape[1]
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    clean = model.generate(**inputs, **gen)
    # hooks run in the order attached: `raw` sees the layer's own output, `out` the steered one
    with vlmsae.record(model, [LAYER]) as raw, \
            vlmsae.steer(model, LAYER, sae, latents={3: 40.0, 7: -20.0}, where="generated") as vector, \
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
    nonpad = ref.kinds(LAYER) != Kind.PAD
    torch.testing.assert_close((rec[LAYER] - ref[LAYER])[nonpad], (3.0 * v).expand(int(nonpad.sum()), -1),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(rec[LAYER][~nonpad], ref[LAYER][~nonpad])
    with vlmsae.steer(model, LAYER, v) as vector:  # strength 1 by default
        assert torch.equal(vector, v)
    with torch.no_grad():
        sae.act_scale.fill_(0.5)  # latents live in scaled units: a decoded direction is W_dec[f] / act_scale
    typical = vlmsae.latent_stats(model, LAYER, sae, [inputs]).mean_firing
    with vlmsae.steer(model, LAYER, sae, {5: 2.0}, relative_to=typical) as vector:
        pass
    latents = torch.zeros(2, sae.cfg.d_sae)
    latents[1, 5] = 2.0 * typical[5]
    with torch.no_grad():
        decoded = (latents @ sae.W_dec + sae.b_dec) / sae.act_scale  # decode(2 x typical x e_5) - decode(0)
    torch.testing.assert_close(vector, decoded[1] - decoded[0])


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
            (steered.kinds(LAYER) != Kind.PAD)[..., None], steered[LAYER]), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="boom"), vlmsae.splice(model, LAYER, sae):
        raise RuntimeError("boom")
    with vlmsae.splice(model, LAYER, sae):  # the same splice works again after the exception
        torch.testing.assert_close(logits(model, inputs), spliced, rtol=0, atol=0)
    assert hook_snapshot(model) == before


def test_bad_input_errors_before_anything_is_attached(model):
    info = vlmsae.layers(model)
    before = hook_snapshot(model)
    sae = make_sae()
    with pytest.raises(vlmsae.ConfigError, match="d_in=32.*d_model=64.*; use an SAE trained on this model "
                                                 r"\(or one of the same width\)$"):
        with vlmsae.splice(model, LAYER, make_sae(d_in=32)):
            pass
    with pytest.raises(vlmsae.ConfigError, match="latent index 256 is out of range.*0..255"):
        with vlmsae.ablate(model, LAYER, sae, [1, 256]):
            pass
    with pytest.raises(vlmsae.ConfigError, match="latent index -1"):
        with vlmsae.steer(model, LAYER, sae, {-1: 2.0}):
            pass
    with pytest.raises(vlmsae.LayerIndexError, match="layer=9"):
        with vlmsae.steer(model, 9, sae, {1: 2.0}):
            pass
    with pytest.raises(vlmsae.ConfigError, match=r"^where=\[\] selects no token; pass None for every non-pad "
                                                 "position, or kind names$"):
        with vlmsae.splice(model, LAYER, sae, where=[]):
            pass
    with pytest.raises(vlmsae.ConfigError, match="selects only padding; use 'text', 'image' or None$"):
        with vlmsae.splice(model, LAYER, sae, where=Kind.PAD):
            pass
    with pytest.raises(vlmsae.ConfigError, match=r"^latent index True is out of range"):
        with vlmsae.ablate(model, LAYER, sae, [True]):
            pass
    with pytest.raises(vlmsae.ConfigError, match=r"^steering with an SAE needs latents=\{index: strength\}, "
                                                 r"e.g. \{12: 8.0\}$"):
        with vlmsae.steer(model, LAYER, sae):
            pass
    with pytest.raises(vlmsae.ConfigError,
                       match="^latents= applies to an SAE; for a raw direction pass strength= only$"):
        with vlmsae.steer(model, LAYER, torch.ones(64), {1: 2.0}):
            pass
    with pytest.raises(vlmsae.ConfigError, match=r"^a steering direction must be \(d_in,\), got shape \(2, 64\)$"):
        with vlmsae.steer(model, LAYER, torch.ones(2, 64)):
            pass
    with pytest.raises(vlmsae.ConfigError, match=r"^steer\(\) takes an SAE or a \(d_in,\) tensor, not str$"):
        with vlmsae.steer(model, LAYER, "feature 3"):
            pass
    with pytest.raises(vlmsae.ConfigError, match="where='pixels'"):
        with vlmsae.splice(model, LAYER, sae, where="pixels"):
            pass
    if not info.has_image_tokens:
        with pytest.raises(vlmsae.ConfigError, match="^where='image' selects no token in a vit-gpt2 model: .*"
                                                     "the image enters by cross-attention\\); use 'text' or None$"):
            with vlmsae.steer(model, LAYER, sae, {1: 1.0}, where="image"):
                pass
    with pytest.raises(vlmsae.ConfigError, match="mode='mean' needs means="):
        with vlmsae.ablate(model, LAYER, sae, [1], mode="mean"):
            pass
    with vlmsae.ablate(model, LAYER, sae, [0]):  # feature 0 is a feature
        pass
    assert hook_snapshot(model) == before


def reference_evaluate(model, sae, batches, where):
    """evaluate()'s row for ``where``, from first principles: the zoo's token ids decide the positions,
    a plain forward hook splices or ablates, a loop over positions reads the next-token losses."""
    ids_key, mask_key = id_keys(batches[0])
    sums = dict.fromkeys(("clean", "spliced", "zero", "mean", "kl", "loss_tokens", "spliced_tokens", "l0"), 0.0)
    xs, errs, fired = [], [], 0
    for batch in batches:
        ids, attended = batch[ids_key], batch[mask_key].bool()
        chosen = {"all": attended, "image": attended & (ids == zoo.IMAGE),
                  "text": attended & (ids >= zoo.FIRST_TEXT_ID)}[where]
        captured = []
        with torch.no_grad(), replace_layer_output(model, LAYER, lambda r: captured.append(r) or r):
            clean = model(**batch).logits.double()
        x = captured[0]
        with torch.no_grad():
            recon, latents = topk_by_hand(sae, x)
        mean = x[chosen].mean(0)
        variants = {"spliced": torch.where(chosen[..., None], recon, x),
                    "zero": torch.where(chosen[..., None], torch.zeros_like(x), x),
                    "mean": torch.where(chosen[..., None], mean, x)}
        logits = {}
        for name, new in variants.items():
            with torch.no_grad(), replace_layer_output(model, LAYER, lambda r, new=new: new):
                logits[name] = model(**batch).logits.double()
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1] - 1):
                # position t is read when it and the next position are real tokens and the next one is text
                if not (attended[b, t] and attended[b, t + 1] and ids[b, t + 1] >= zoo.FIRST_TEXT_ID):
                    continue
                target = ids[b, t + 1]
                p = clean[b, t].log_softmax(-1)
                sums["clean"] -= p[target].item()
                for name in variants:
                    sums[name] -= logits[name][b, t].log_softmax(-1)[target].item()
                q = logits["spliced"][b, t].log_softmax(-1)
                sums["kl"] += (p.exp() * (p - q)).sum().item()
                sums["loss_tokens"] += 1
        sums["spliced_tokens"] += chosen.sum().item()
        sums["l0"] += (latents[chosen] != 0).sum().item()
        fired = (latents[chosen] != 0).any(0) | fired
        xs.append(x[chosen].double())
        errs.append((x[chosen] - recon[chosen]).double().pow(2).sum())
    n = sums["loss_tokens"]
    ce = {k: sums[k] / n for k in ("clean", "spliced", "zero", "mean")}
    x = torch.cat(xs)
    return {"ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero": ce["zero"], "ce_mean": ce["mean"],
            "loss_recovered": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"]), "kl": sums["kl"] / n,
            "loss_tokens": n, "fvu": (sum(errs) / (x - x.mean(0)).pow(2).sum()).item(),
            "l0": sums["l0"] / sums["spliced_tokens"], "spliced_tokens": sums["spliced_tokens"],
            "dead": 1 - fired.double().mean().item()}


def own_text(model, seed):
    """A prompt continued by the model's own greedy tokens: text the random model predicts well."""
    inputs = tiny_inputs(model, 3, seed=seed, padding="left", text_len=2)
    return with_sequences(model, inputs, model.generate(**inputs, max_new_tokens=8, min_new_tokens=8,
                                                         do_sample=False))


def test_evaluate(model):
    info = vlmsae.layers(model)
    batches = [own_text(model, seed) for seed in range(2)]
    special = vlmsae.special_token_ids(model, zoo.tokenizer(model))  # Idefics3's image wrapping: only its tokenizer
    perfect = vlmsae.evaluate(model, LAYER, identity_sae(), batches, special_ids=special)
    assert isinstance(perfect, pd.DataFrame)
    assert list(perfect.index) == (["all", "image", "text"] if info.has_image_tokens else ["all"])
    for row in perfect.itertuples():
        assert row.loss_recovered == pytest.approx(1.0, abs=1e-5)
        assert abs(row.kl) < 1e-6 and row.fvu < 1e-10
    untrained = vlmsae.evaluate(model, LAYER, make_sae(), batches, special_ids=special)
    assert (untrained["ce_zero"] > untrained["ce_clean"]).all()
    assert untrained.loc["all", "loss_recovered"] < 0.8 and (untrained["loss_recovered"] < 1).all()
    assert (untrained["kl"] > 0).all()
    assert (untrained["fvu"] > 0.1).all() and (untrained["l0"] <= 8).all()
    assert (untrained["dead"] > 0).all() and (untrained["dead"] < 1).all()  # a check that can tell them apart
    for where in untrained.index:
        expected = reference_evaluate(model, make_sae(), batches, where)
        got = untrained.loc[where]
        for column, value in expected.items():
            tolerance = dict(rel=1e-4, abs=1e-6) if column in ("kl", "fvu") else dict(rel=1e-5)
            if column == "loss_recovered":  # a ratio of CE differences: the CEs' 1e-5, propagated
                tolerance = dict(abs=3e-5 * expected["ce_zero"] / (expected["ce_zero"] - expected["ce_clean"]))
            assert got[column] == pytest.approx(value, **tolerance), (where, column)
    if info.has_image_tokens:
        assert untrained.loc["all", "spliced_tokens_image"] == untrained.loc["image", "spliced_tokens"]


def test_evaluate_reads_the_logits_a_few_positions_at_a_time(model, monkeypatch):
    """Cross-entropy and KL come from the loss positions only, CHUNK_ROWS of them in float32 at a time (at a
    150k vocabulary the whole batch would be gigabytes): any chunk size gives the same table."""
    import sys

    batches = [own_text(model, seed) for seed in range(2)]
    whole = vlmsae.evaluate(model, LAYER, make_sae(), batches)
    monkeypatch.setattr(sys.modules["vlmsae.evaluate"], "CHUNK_ROWS", 3)
    pd.testing.assert_frame_equal(vlmsae.evaluate(model, LAYER, make_sae(), batches), whole, rtol=1e-6, atol=1e-7)
