"""Multimodal metrics (issue 15, item 4; Kaushik et al. 2026, arXiv 2601.20028): the modality census and zero-shot
classification from sparse codes, on hand-built codes against references written as plain loops, and on
Shapes-CLIP: the raw embeddings as codes reproduce ``testbed.clip.zero_shot``; codes of trained SAEs classify
well above chance."""

import math

import pytest
import torch
import torch.nn.functional as F

import vlmsae
from vlmsae import metrics
from vlmsae.errors import ConfigError, NonFiniteError
from vlmsae.multimodal import MODALITY_LABELS
from vlmsae.testbed import clip, models, shapes


def loop_census(z_image, z_text, threshold):
    """Per latent: (label, image fraction, text fraction), from plain loops over rows."""
    out = []
    for j in range(z_image.shape[1]):
        image = [float(z_image[i, j]) > threshold for i in range(len(z_image))]
        text = [float(z_text[i, j]) > threshold for i in range(len(z_text))]
        label = {(True, False): "image_only", (False, True): "text_only", (True, True): "both",
                 (False, False): "dead"}[(any(image), any(text))]
        out.append((label, sum(image) / len(image), sum(text) / len(text)))
    return out


def test_census_counts_latents_by_construction():
    """Latents 0-2 fire on images only, 3-4 on texts only, 5-8 on both, 9-11 on neither (11 holds negative
    values: below 0 is not firing); rows unpaired, 7 images and 5 texts."""
    g = torch.Generator().manual_seed(0)
    z_image, z_text = torch.zeros(7, 12), torch.zeros(5, 12)
    for j in (0, 1, 2, 5, 6, 7, 8):
        rows = torch.randperm(7, generator=g)[:1 + j % 3]
        z_image[rows, j] = torch.rand(len(rows), generator=g) + 0.1
    for j in (3, 4, 5, 6, 7, 8):
        rows = torch.randperm(5, generator=g)[:1 + j % 2]
        z_text[rows, j] = torch.rand(len(rows), generator=g) + 0.1
    z_image[2, 11], z_text[0, 11] = -1.0, -0.5

    census = vlmsae.modality_census(z_image, z_text)
    assert census.counts() == {"image_only": 3, "text_only": 2, "both": 4, "dead": 3}
    assert (census.n_image, census.n_text, census.threshold) == (7, 5, 0.0)
    reference = loop_census(z_image, z_text, 0.0)
    assert census.latents["label"].tolist() == [label for label, _, _ in reference]
    assert census.latents["image_fraction"].tolist() == pytest.approx([f for _, f, _ in reference])
    assert census.latents["text_fraction"].tolist() == pytest.approx([f for _, _, f in reference])
    assert list(census.latents["label"].cat.categories) == list(MODALITY_LABELS)

    # Above a threshold: the same definition, fewer firings (the reference recomputed by the loops).
    census = vlmsae.modality_census(z_image, z_text, threshold=0.6)
    reference = loop_census(z_image, z_text, 0.6)
    assert census.latents["label"].tolist() == [label for label, _, _ in reference]
    assert census.counts() == {name: sum(r[0] == name for r in reference) for name in MODALITY_LABELS}
    assert census.counts() != {"image_only": 3, "text_only": 2, "both": 4, "dead": 3}  # the threshold mattered


@pytest.mark.parametrize("z_image, z_text, kwargs, error, message", [
    (torch.zeros(3, 8), torch.zeros(3, 9), {}, ConfigError, r"z_image has d_sae=8 and z_text d_sae=9"),
    (torch.zeros(0, 8), torch.zeros(3, 8), {}, ConfigError, r"z_image has shape \(0, 8\); pass codes"),
    (torch.zeros(8), torch.zeros(3, 8), {}, ConfigError, r"z_image has shape \(8,\)"),
    (torch.zeros(3, 8), torch.zeros(3, 8), {"threshold": -1}, ConfigError, r"threshold=-1 must be a finite number"),
    (torch.zeros(3, 8), torch.tensor([[0.0] * 8, [math.nan] + [0.0] * 7]), {}, NonFiniteError,
     r"z_text holds NaN or Inf in 1 rows \(\[1\]\)"),
])
def test_census_errors_name_the_value(z_image, z_text, kwargs, error, message):
    with pytest.raises(error, match=message):
        vlmsae.modality_census(z_image, z_text, **kwargs)


def loop_zero_shot(image_codes, prompt_codes, similarity, reduce):
    """Predictions from plain loops: per image, per class, the max (mean) over its prompts of the similarity."""
    predictions = []
    for a in image_codes.tolist():
        scores = []
        for prompts in prompt_codes.tolist():
            sims = []
            for b in prompts:
                dot = sum(x * y for x, y in zip(a, b))
                norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
                sims.append(dot if similarity == "dot" else (dot / norms if norms else 0.0))
            scores.append(max(sims) if reduce == "max" else sum(sims) / len(sims))
        predictions.append(max(range(len(scores)), key=lambda c: (scores[c], -c)))  # ties: lowest class
    return predictions


def test_zero_shot_from_hand_built_codes():
    # One prompt per class. Image 0 points at class 1 but class 0's long prompt wins a dot product;
    # image 1 is all zeros (cosine 0 with every class: the lowest class, no NaN).
    prompts = torch.tensor([[10.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    images = torch.tensor([[1.0, 2.0, 0], [0, 0, 0], [0, 0.5, 3.0]])
    result = vlmsae.zero_shot_from_codes(images, prompts)
    assert result.predictions.tolist() == [1, 0, 2] and result.scores.shape == (3, 3)
    assert torch.isfinite(result.scores).all() and result.scores[1].eq(0).all()
    assert vlmsae.zero_shot_from_codes(images, prompts, similarity="dot").predictions.tolist() == [0, 0, 2]
    assert result.accuracy(torch.tensor([1, 2, 2])) == pytest.approx(2 / 3)

    # Several prompts per class, sparse non-negative codes, against the loops; max and mean disagree somewhere.
    g = torch.Generator().manual_seed(3)
    image_codes = torch.rand(40, 16, generator=g) * (torch.rand(40, 16, generator=g) < 0.3)
    prompt_codes = torch.rand(5, 3, 16, generator=g) * (torch.rand(5, 3, 16, generator=g) < 0.3)
    found = {}
    for similarity in ("cosine", "dot"):
        for reduce in ("max", "mean"):
            got = vlmsae.zero_shot_from_codes(image_codes, prompt_codes, similarity=similarity, reduce=reduce)
            found[similarity, reduce] = got.predictions.tolist()
            assert found[similarity, reduce] == loop_zero_shot(image_codes, prompt_codes, similarity, reduce)
    assert found["cosine", "max"] != found["cosine", "mean"] and found["cosine", "max"] != found["dot", "max"]
    # (n_classes, d_sae) is (n_classes, 1, d_sae)
    assert torch.equal(vlmsae.zero_shot_from_codes(image_codes, prompt_codes[:, 0]).predictions,
                       vlmsae.zero_shot_from_codes(image_codes, prompt_codes[:, :1]).predictions)


@pytest.mark.parametrize("image_codes, prompt_codes, kwargs, error, message", [
    (torch.zeros(4, 8), torch.zeros(3, 9), {}, ConfigError, r"prompt_codes has d_sae=9 and image_codes d_sae=8"),
    (torch.zeros(4, 8), torch.zeros(8), {}, ConfigError, r"prompt_codes has shape \(8,\); pass \(n_classes, d_sae\)"),
    (torch.zeros(4, 8), torch.zeros(3, 8), {"similarity": "l2"}, ConfigError, r"similarity='l2' is unknown"),
    (torch.zeros(4, 8), torch.zeros(3, 8), {"reduce": "sum"}, ConfigError, r"reduce='sum' is unknown"),
    (torch.full((4, 8), math.inf), torch.zeros(3, 8), {}, NonFiniteError, r"image_codes holds NaN or Inf in 4 rows"),
])
def test_zero_shot_errors_name_the_value(image_codes, prompt_codes, kwargs, error, message):
    with pytest.raises(error, match=message):
        vlmsae.zero_shot_from_codes(image_codes, prompt_codes, **kwargs)
    with pytest.raises(ConfigError, match=r"labels has shape \(3,\); one class index per image is \(2,\)"):
        vlmsae.zero_shot_from_codes(torch.eye(2), torch.eye(2)).accuracy(torch.tensor([0, 1, 1]))


# --- Shapes-CLIP ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    return clip.load_clip()


@pytest.fixture(scope="module")
def zero_shot_set(shipped):
    """Single-object images never seen in training: their embeddings (n, d), the prompt embeddings laid out
    (colors, shapes, d), and the labels."""
    model, tok = shipped
    samples = clip.single_object_samples(300, models.EVAL_SEED + 4242)
    with torch.no_grad():
        images = clip.image_embeds(model, shapes.pixel_values(samples))
        prompts = [f"a {c} {s}" for c in shapes.COLORS for s in shapes.SHAPES]
        text = clip.text_embeds(model, **clip.text_inputs(prompts, tok))
    labels = {c: torch.tensor([values.index(s.objects[0].value(c)) for s in samples])
              for c, values in (("color", shapes.COLORS), ("shape", shapes.SHAPES))}
    return samples, images, text.reshape(len(shapes.COLORS), len(shapes.SHAPES), -1), labels


def test_raw_embeddings_as_codes_give_clips_own_zero_shot(shipped, zero_shot_set):
    """The identity encoder: the embeddings themselves as codes predict what testbed.clip.zero_shot predicts
    (colour by the max over shapes, shape by the max over colours), image by image."""
    samples, images, prompts, _ = zero_shot_set
    reference = clip.zero_shot(*shipped, samples)
    color = vlmsae.zero_shot_from_codes(images, prompts).predictions
    shape = vlmsae.zero_shot_from_codes(images, prompts.transpose(0, 1)).predictions
    assert [shapes.COLORS[i] for i in color.tolist()] == [p["color"][0] for p in reference]
    assert [shapes.SHAPES[i] for i in shape.tolist()] == [p["shape"][0] for p in reference]
    mean = clip.zero_shot(*shipped, samples, reduce="mean")
    got = vlmsae.zero_shot_from_codes(images, prompts.transpose(0, 1), reduce="mean").predictions
    assert [shapes.SHAPES[i] for i in got.tolist()] == [p["shape"][0] for p in mean]


@pytest.fixture(scope="module")
def train_pairs(shipped):
    model, tok = shipped
    batches = (clip.clip_inputs(shapes.make_samples(128, 7_000_000 + i), tok) for i in range(16))
    x_image, x_text = vlmsae.embedding_pairs(model, batches)
    return F.normalize(x_image, dim=-1), F.normalize(x_text, dim=-1)


def accuracies(encode_image, encode_text, zero_shot_set) -> dict[str, float]:
    _, images, prompts, labels = zero_shot_set
    image_codes, prompt_codes = encode_image(F.normalize(images, dim=-1)), encode_text(F.normalize(prompts, dim=-1))
    return {"color": vlmsae.zero_shot_from_codes(image_codes, prompt_codes).accuracy(labels["color"]),
            "shape": vlmsae.zero_shot_from_codes(image_codes, prompt_codes.transpose(0, 1)).accuracy(labels["shape"])}


def test_codes_of_trained_saes_classify_well_above_chance(train_pairs, zero_shot_set):
    """One SAE trained on the union of image and text embeddings (one encoder for both), and an MGSAE trained on
    the pairs (encode with the modality): zero-shot from their codes alone, chance 0.2 for colour, 1/3 for shape.
    Their census over 512 pairs accounts for every latent."""
    torch.set_num_threads(1)
    x_image, x_text = train_pairs
    torch.manual_seed(0)
    plain = vlmsae.SAE(d_in=x_image.shape[1], d_sae=256, k=8)
    trainer = vlmsae.SAETrainer(plain, lr=1e-3, sync_every=100)
    for step in range(300):
        rows = torch.randperm(len(x_image), generator=torch.Generator().manual_seed(step))[:256]
        trainer.step(torch.cat([x_image[rows], x_text[rows]]))
    plain.eval()
    torch.manual_seed(0)
    paired = vlmsae.MGSAE(d_in=x_image.shape[1], d_sae=256, k=8)
    vlmsae.train_mgsae(x_image, x_text, paired, steps=300, batch_size=256, lr=1e-3, sync_every=100, progress=False)
    paired.eval()
    with torch.no_grad():
        found = {"plain": accuracies(plain.encode, plain.encode, zero_shot_set),
                 "mgsae": accuracies(lambda x: paired.encode(x, "image"), lambda x: paired.encode(x, "text"),
                                     zero_shot_set)}
        print("\nzero-shot from codes, 300 single-object images:", found)
        assert found["plain"]["color"] >= 0.6 and found["mgsae"]["color"] >= 0.9, found
        assert found["mgsae"]["shape"] >= 0.7, found
        assert metrics.fvu(x_image, paired(x_image, "image").recon) < 0.1
        census = vlmsae.modality_census(paired.encode(x_image[:512], "image"), paired.encode(x_text[:512], "text"))
    assert sum(census.counts().values()) == 256 and census.n_image == census.n_text == 512
    assert census.latents["label"].value_counts().to_dict() == census.counts()
