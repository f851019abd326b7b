"""Shapes-CLIP (vlmsae.testbed.clip): the shipped dual encoder loads offline and classifies fresh Shapes
images zero-shot; its training is deterministic; its descriptions mean what they say."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vlmsae
from vlmsae.metrics import auroc
from vlmsae.testbed import clip, models, shapes
from vlmsae.testbed.__main__ import main

GOAL = 0.95
N_FRESH = 300  # fresh single-object images; seeds from models.EVAL_SEED up, which training never draws


@pytest.fixture(scope="module")
def shipped():
    return clip.load_clip()


@pytest.fixture(scope="module")
def fresh():
    return clip.single_object_samples(N_FRESH, models.EVAL_SEED + 777)


def accuracy(predictions, samples) -> dict[str, float]:
    return {c: sum(p[c] == (s.objects[0].value(c),) for p, s in zip(predictions, samples)) / len(samples)
            for c in ("color", "shape")}


def test_clip_loads_offline(shipped):
    model, tok = shipped
    assert isinstance(model, clip.CLIPModel)
    vision = model.config.vision_config
    assert vision.image_size // vision.patch_size == shapes.GRID  # the 6 x 6 patch grid the docstring names
    assert tok.eos_token == clip.EOT_TOKEN and tok.eos_token_id == model.config.text_config.eos_token_id
    assert tok.eos_token_id != 2  # 2 would select transformers' legacy argmax pooling
    assert tok.pad_token_id == shapes.PAD and len(tok) == model.config.text_config.vocab_size


@torch.no_grad()
def test_zero_shot_accuracy_on_fresh_samples(shipped, fresh):
    torch.set_num_threads(2)
    result = accuracy(clip.zero_shot(*shipped, fresh), fresh)
    print(f"\nShapes-CLIP zero-shot accuracy on {N_FRESH} fresh single-object images:", result)
    assert min(result.values()) >= GOAL, result


@torch.no_grad()
def test_zero_shot_is_the_best_prompt_of_clips_own_forward(shipped, fresh):
    """On single-object images the max-reduced prediction is the prompt that ``model(...)``'s own
    ``logits_per_image`` ranks first (a reference that does not go through ``zero_shot``)."""
    model, tok = shipped
    samples = fresh[:64]
    prompts = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES]
    out = model(**clip.clip_inputs(samples, tok, [f"a {c} {s}" for c, s in prompts]))
    best = [prompts[i] for i in out.logits_per_image.argmax(1).tolist()]
    predicted = clip.zero_shot(model, tok, samples)
    assert [(p["color"][0], p["shape"][0]) for p in predicted] == best


@torch.no_grad()
def test_image_and_text_features_are_the_forwards_embeddings(shipped, fresh):
    model, tok = shipped
    inputs = clip.clip_inputs(fresh[:8], tok)
    out = model(**inputs)
    image = clip.image_embeds(model, inputs["pixel_values"])
    text = clip.text_embeds(model, inputs["input_ids"], inputs["attention_mask"])
    assert image.shape == text.shape == (8, model.config.projection_dim)
    torch.testing.assert_close(F.normalize(image, dim=-1), out.image_embeds)
    torch.testing.assert_close(F.normalize(text, dim=-1), out.text_embeds)
    # Padding changes nothing: the text tower pools at <eot>, before any <pad>.
    alone = clip.text_inputs([fresh[0].caption], tok)
    torch.testing.assert_close(clip.text_embeds(model, **alone)[0], text[0])


@torch.no_grad()
def test_an_untrained_clip_fails_the_accuracy_goal(fresh):
    """The accuracy test can fail: the same measurement on fresh weights is near chance."""
    torch.manual_seed(0)
    tok = clip.build_clip_tokenizer()
    model = clip.CLIPModel(clip.clip_config(clip.ShapesClipConfig(), tok)).eval()
    result = accuracy(clip.zero_shot(model, tok, fresh[:100]), fresh[:100])
    assert max(result.values()) < 0.6, result


def test_descriptions_name_what_the_image_shows():
    samples = shapes.make_samples(64, seed=models.EVAL_SEED + 5)
    one = next(s for s in samples if len(s.objects) == 1)
    two = next(s for s in samples if len(s.objects) == 2)
    assert clip.describe(one).text == one.caption and clip.describe(two).text == two.caption
    o = one.objects[0]
    assert clip.describe(one, ("color",)).text == f"a {o.color} shape"
    assert clip.describe(one, ()).text == "a shape"
    assert clip.describe(two, ("shape",)).text == " and ".join(f"a {x.shape}" for x in two.objects)
    descriptions = [clip.describe(s, ("color", "shape")) for s in samples]
    match = clip.match_matrix(samples, descriptions)
    assert match.diagonal().all()
    # Reference: same object count and the same (colour, shape) list in reading order.
    key = [tuple((x.color, x.shape) for x in s.objects) for s in samples]
    assert match.tolist() == [[a == b for b in key] for a in key]
    assert not clip.describe(one).describes(two) and not clip.describe(two, ()).describes(one)


def test_training_is_deterministic(tmp_path):
    cfg = clip.ShapesClipConfig(steps=3, warmup=1, batch=8, d_model=32, vision_layers=1, text_layers=1,
                                projection_dim=16, patch_aux=1.0, patch_aux_layers=1, threads=1)
    a, _ = clip.train_clip(tmp_path / "a", cfg)
    b, _ = clip.train_clip(None, cfg)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    # Drawing the next batch on a second thread (the default) or between steps trains the same model.
    serial, _ = clip.train_clip(None, clip.ShapesClipConfig(**{**cfg.__dict__, "prefetch": 0}))
    for (name, x), y in zip(a.state_dict().items(), serial.state_dict().values()):
        assert torch.equal(x, y), name
    two_heads = clip.ShapesClipConfig(**{**cfg.__dict__, "vision_layers": 2, "patch_aux_layers": 2})
    d, _ = clip.train_clip(None, two_heads)
    e, _ = clip.train_clip(None, clip.ShapesClipConfig(**{**two_heads.__dict__, "prefetch": 0}))
    assert all(torch.equal(x, y) for x, y in zip(d.state_dict().values(), e.state_dict().values()))
    c, _ = clip.train_clip(None, clip.ShapesClipConfig(**{**cfg.__dict__, "seed": 1}))
    assert not torch.equal(c.visual_projection.weight, a.visual_projection.weight)
    loaded, tok = clip.load_clip(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert torch.equal(loaded.visual_projection.weight, a.visual_projection.weight)
    assert tok.eos_token == clip.EOT_TOKEN


def test_training_options_belong_to_the_model():
    with pytest.raises(SystemExit):
        main(["train", "clip", "--n-layers", "2"])
    with pytest.raises(SystemExit):
        main(["train", "qa", "--text-layers", "2"])


def test_vision_site_heatmaps_put_the_hot_patches_on_the_object(shipped):
    """Issue 14: an SAE trained online at a vision-tower site of Shapes-CLIP has, for each colour, a latent whose
    ``scan`` heatmaps rank the patches of objects of that colour above every other patch (background and other
    objects), AUROC >= 0.9 for the best colour. The truth is the renderer's own patch coverage
    (``Sample.patch_labels``), not anything the scan computed; a heatmap in the wrong patch order scores near 0.5."""
    torch.set_num_threads(2)
    model, tok = shipped
    name = "vision.blocks.0.hook_resid_post"
    width = vlmsae.layers(model).width("vision.resid_post")
    torch.manual_seed(0)
    # k 16: on the shipped model (900 steps) k 8 gave a best colour AUROC of 0.844, k 16 0.910 (min 0.815)
    sae = vlmsae.SAE(d_in=width, d_sae=8 * width, k=16)
    batches = (clip.clip_inputs(shapes.make_samples(64, models.TRAIN_SEED + i), tok) for i in range(80))
    vlmsae.train(model, name, batches, sae, steps=300, batch_size=256, buffer_size=4096, progress=False)

    samples = shapes.make_samples(200, models.EVAL_SEED + 11)
    owner = [s.patch_labels().reshape(-1) for s in samples]
    colour = np.array([[s.objects[o].color if o >= 0 else "none" for o in row] for s, row in zip(samples, owner)])
    data = [clip.clip_inputs(samples[i:i + 50], tok) for i in range(0, len(samples), 50)]
    # Every example of every latent kept, so the heatmaps cover all 200 images.
    result = vlmsae.scan(model, name, sae, data, n_examples=len(samples))
    n_latents = len(result.top.latents)
    heat = torch.zeros(n_latents, len(samples), shapes.GRID * shapes.GRID)
    for row in range(n_latents):
        kept = result.top.example[row] >= 0
        heat[row, result.top.example[row][kept]] = result.top.heatmap(row)[kept].flatten(1)
    heat = heat.flatten(1).T  # (patches of all images, latents)
    best = {}
    for c in shapes.COLORS:
        is_c = torch.from_numpy(colour == c).flatten()
        scores = auroc(heat[is_c], heat[~is_c])
        best[c] = (round(float(scores.max()), 3), int(result.top.latents[scores.argmax()]))
    print("\nbest patch AUROC per colour (score, latent):", best)
    assert max(score for score, _ in best.values()) >= 0.9, best
    assert min(score for score, _ in best.values()) >= 0.8, best
