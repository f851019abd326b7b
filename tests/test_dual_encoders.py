"""Dual encoders (issue 14, item 3): CLIPModel and SiglipModel as families. Both towers' residual streams and the
pooled embeddings are sites; (image, caption) pairs recorded in one forward stay paired; zero-shot logits follow a
splice at the embeddings. References: the models' own get_image_features / get_text_features and
output_hidden_states, and the logits written out by hand."""

import pytest
import torch

import vlmsae
from vlmsae.zoo import DUAL_ENCODERS, tiny_inputs, tiny_model

from conftest import hook_snapshot


@pytest.fixture(scope="module", params=DUAL_ENCODERS)
def dual(request):
    model = tiny_model(request.param)
    with torch.no_grad():  # let transformers install its output-capture hooks before any snapshot
        model(**tiny_inputs(model, 1), output_hidden_states=True)
    return request.param, model, tiny_inputs(model, 4)


def features(out) -> torch.Tensor:
    """get_image_features / get_text_features return the pooled tensor in transformers 4, a model output whose
    pooler_output holds it in transformers 5."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def by_hand(family: str, model, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """logits_per_image written out: cosine similarity times exp(logit_scale) (plus SigLIP's logit_bias)."""
    i = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    t = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    logits = i @ t.T * model.logit_scale.exp()
    return logits + model.logit_bias if family == "siglip" else logits


def test_embeddings_equal_get_features_and_stay_paired(dual):
    family, model, inputs = dual
    with torch.no_grad():
        want_image = features(model.get_image_features(pixel_values=inputs["pixel_values"]))
        want_text = features(model.get_text_features(input_ids=inputs["input_ids"],
                                                     attention_mask=inputs["attention_mask"]))
        with vlmsae.record(model, "hook_image_embeds") as image, vlmsae.record(model, "hook_text_embeds") as text:
            out = model(**inputs)
    d = vlmsae.layers(model).width("image_embeds")
    assert d == want_image.shape[-1] == vlmsae.layers(model).width("text_embeds")
    assert image[0].shape == text[0].shape == (4, d)
    assert torch.equal(image["hook_image_embeds"], image[0])
    assert torch.equal(image[0], want_image) and torch.equal(text[0], want_text)
    assert (image.kinds(0) == vlmsae.Kind.IMAGE).all() and (text.kinds(0) == vlmsae.Kind.TEXT).all()
    # row i of one is paired with row i of the other: the model's own logits come from exactly these pairs
    assert torch.allclose(out.logits_per_image, by_hand(family, model, image[0], text[0]), atol=1e-5)


@pytest.mark.parametrize("family", DUAL_ENCODERS)
def test_tower_captures_equal_their_own_hidden_states(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model, 3)
    with torch.no_grad():
        vision = model.vision_model(pixel_values=inputs["pixel_values"], output_hidden_states=True).hidden_states
        text = model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                output_hidden_states=True).hidden_states
        with vlmsae.record(model, range(2), site="vision.resid_post") as v, \
                vlmsae.record(model, range(4), site="text.resid_pre") as t:
            model(**inputs)
    for layer in range(2):
        assert torch.equal(v[layer], vision[layer + 1])
    for layer in range(4):
        assert torch.equal(t[layer], text[layer])
    kinds = t.kinds(0)
    assert (kinds == torch.where(inputs["attention_mask"] == 0, vlmsae.Kind.PAD,
                                 torch.where(inputs["input_ids"] == 1, vlmsae.Kind.SPECIAL, vlmsae.Kind.TEXT))).all()
    assert (v.kinds(0)[:, 0] == (vlmsae.Kind.SPECIAL if family == "clip" else vlmsae.Kind.IMAGE)).all()


def test_zero_shot_logits_follow_a_spliced_image_embedding(dual):
    family, model, inputs = dual
    sae = vlmsae.SAE(d_in=vlmsae.layers(model).width("image_embeds"), d_sae=64, k=4)
    with torch.no_grad():
        clean = model(**inputs)
        with vlmsae.splice(model, "hook_image_embeds", sae, use_error_term=True, edit=lambda z, f: z.clone()):
            kept = model(**inputs).logits_per_image
        with vlmsae.record(model, "hook_image_embeds") as image, vlmsae.record(model, "hook_text_embeds") as text, \
                vlmsae.splice(model, "hook_image_embeds", sae):
            spliced = model(**inputs).logits_per_image
    assert torch.equal(kept, clean.logits_per_image)
    assert not torch.allclose(spliced, clean.logits_per_image)
    recon = vlmsae.reconstruct(image[0], sae)  # the record (outer) saw the clean embeddings
    assert torch.allclose(spliced, by_hand(family, model, recon, text[0]), atol=1e-5)
    labels = spliced.argmax(-1)  # zero-shot: each image's best caption, through the spliced embedding
    assert torch.equal(labels, by_hand(family, model, recon, text[0]).argmax(-1))


def test_no_hook_left_after_an_exception_at_dual_encoder_sites(dual):
    family, model, inputs = dual
    before = hook_snapshot(model)
    with torch.no_grad():
        clean = model(**inputs).logits_per_image

    def boom(resid, fwd):
        raise RuntimeError("boom")

    for name in ("hook_image_embeds", "hook_text_embeds", "text.blocks.1.hook_resid_pre", "vision.blocks.1.hook_resid_post"):
        with pytest.raises(RuntimeError, match="boom"), vlmsae.attach(model, {name: boom}), torch.no_grad():
            model(**inputs)
        assert hook_snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits_per_image, clean)


def test_steering_a_tower_moves_its_embeddings_only(dual):
    family, model, inputs = dual
    info = vlmsae.layers(model)
    with torch.no_grad():
        clean = model(**inputs)
        v = torch.randn(info.width("text.resid_post"), generator=torch.Generator().manual_seed(0))
        with vlmsae.steer(model, "text.blocks.2.hook_resid_post", v, strength=3.0, where="text"):
            steered = model(**inputs)
    assert torch.equal(steered.image_embeds, clean.image_embeds)
    assert not torch.allclose(steered.text_embeds, clean.text_embeds)
    with pytest.raises(vlmsae.SiteError, match=f"not a hook site of this {family} model"):
        with vlmsae.record(model, [0]):  # a dual encoder has no decoder
            pass


def test_train_at_the_image_embeddings(dual, tmp_path):
    family, model, _ = dual
    batches = [tiny_inputs(model, 8, seed=i) for i in range(3)]
    width = vlmsae.layers(model).width("image_embeds")
    sae = vlmsae.SAE(d_in=width, d_sae=4 * width, k=4)
    before = sae.W_enc.detach().clone()
    vlmsae.train(model, "hook_image_embeds", batches, sae, steps=4, batch_size=4, buffer_size=8, progress=False,
                 out=tmp_path, k_start=None, warmup_steps=1, outlier_factor=None)
    assert not torch.equal(sae.W_enc, before)
    assert vlmsae.SAE.load(tmp_path / "L0").metadata["hook_name"] == "hook_image_embeds"
