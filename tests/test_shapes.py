"""Shapes data: deterministic, labels that agree with pixels and text, sequences that agree with labels."""

import colorsys

import numpy as np
import pytest

from vlmsae import zoo
from vlmsae.errors import ConfigError
from vlmsae.testbed import shapes


@pytest.fixture(scope="module")
def samples():
    return shapes.make_samples(200, seed=123)


@pytest.fixture(scope="module")
def tokenizer():
    return shapes.build_tokenizer()


def test_deterministic_from_seed():
    a, b = shapes.make_samples(20, seed=7), shapes.make_samples(20, seed=7)
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and x.objects == y.objects and np.array_equal(x.masks, y.masks)
    c = shapes.make_samples(20, seed=8)
    assert not any(np.array_equal(x.image, y.image) for x, y in zip(a, c))


def test_no_two_images_alike(samples):
    flat = np.stack([s.image.ravel() for s in samples])
    d = ((flat[:, None] - flat[None]) ** 2).mean(-1)
    assert (d + np.eye(len(samples)) > 1e-3).all()


def test_every_value_occurs(samples):
    seen = {o.value(c) for s in samples for o in s.objects for c in shapes.CONCEPTS}
    assert seen == {v for values in shapes.CONCEPTS.values() for v in values}
    assert {s.count for s in samples} == set(shapes.COUNTS)


def test_caption_matches_labels(samples):
    for s in samples:
        phrases = s.caption.split(" and ")
        assert len(phrases) == len(s.objects)
        for phrase, o in zip(phrases, s.objects):
            a, size, color, shape, at, the, vertical, horizontal = phrase.split()
            assert (a, at, the) == ("a", "at", "the")
            assert (size, color, shape, vertical, horizontal) == (o.size, o.color, o.shape, o.vertical, o.horizontal)
        # Reading order: top left, top right, bottom left, bottom right.
        quadrant = [shapes.VERTICAL.index(o.vertical) * 2 + shapes.HORIZONTAL.index(o.horizontal) for o in s.objects]
        assert quadrant == sorted(set(quadrant))


def test_pixels_match_labels(samples):
    """Each object's pixels show its colour's hue, lie in its quadrant, and have its size."""
    hues = {c: colorsys.rgb_to_hsv(*colorsys.hsv_to_rgb(h, 1, 1))[0] for c, h in shapes._HUE.items()}
    for s in samples:
        assert s.masks.shape == (len(s.objects), shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
        assert s.masks.sum(0).max() <= 1  # disjoint
        for o, m in zip(s.objects, s.masks):
            rgb = s.image[:, m].mean(1)
            hue = colorsys.rgb_to_hsv(*rgb)[0]
            nearest = min(hues, key=lambda c: min(abs(hues[c] - hue), 1 - abs(hues[c] - hue)))
            assert nearest == o.color
            rows, cols = np.nonzero(m)
            half = shapes.QUADRANT
            assert ((rows < half) if o.vertical == "top" else (rows >= half)).all()
            assert ((cols < half) if o.horizontal == "left" else (cols >= half)).all()
            extent = max(np.ptp(rows), np.ptp(cols)) + 1
            assert (extent <= 13) if o.size == "small" else (extent >= 15)


def test_patch_labels_cover_object_pixels(samples):
    p = shapes.PATCH
    for s in samples[:50]:
        owner = s.patch_labels()
        assert owner.shape == (shapes.GRID, shapes.GRID)
        for j, m in enumerate(s.masks):
            rows, cols = np.nonzero(m)
            assert (owner[rows // p, cols // p] == j).all()
            # and only patches that hold some of its pixels
            assert ((owner == j) == (s.patch_coverage()[j] > 0)).all()
    owner16 = samples[0].patch_labels(16)
    assert owner16.shape == (3, 3)
    with pytest.raises(ConfigError):
        samples[0].patch_labels(7)


def test_every_question_answerable(samples, tokenizer):
    for s in samples:
        for key, text in shapes.QUESTIONS.items():
            ans = s.answer(key)
            assert ans == s.answer(text) == s.answers[key]
            items = ans.split(" and ")
            assert len(items) == (1 if key == "count" else len(s.objects))
            assert shapes.UNK not in tokenizer(text + " " + ans, add_special_tokens=False)["input_ids"]
    with pytest.raises(ConfigError):
        samples[0].answer("what is the meaning of it?")


def test_tokenizer_follows_zoo_layout(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(list(shapes.SPECIAL_TOKENS[:7]))
    assert ids == [zoo.PAD, zoo.BOS, zoo.EOS, zoo.IMAGE, zoo.VISION_START, zoo.VISION_END, zoo.VIDEO]
    assert tokenizer.pad_token_id == 0 and tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    text = "a small red circle at the top left"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_captioner_inputs_and_concept_sites(samples, tokenizer):
    inp = shapes.captioner_inputs(samples[:16], tokenizer)
    assert inp["pixel_values"].shape == (16, 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    assert -1 <= inp["pixel_values"].min() and inp["pixel_values"].max() <= 1
    ids, labels = inp["decoder_input_ids"], inp["labels"]
    assert (ids[:, 0] == shapes.BOS).all()
    # labels are the inputs shifted by one, then <eos>
    keep = (labels[:, :-1] != -100) & (labels[:, :-1] != shapes.EOS)
    assert (labels[:, :-1][keep] == ids[:, 1:][keep]).all()
    assert ((labels == shapes.EOS).sum(1) == 1).all()
    for i, s in enumerate(samples[:16]):
        sites = shapes.concept_sites(s)
        assert len(sites) == 5 * len(s.objects)
        for site in sites:
            assert ids[i, site.token] == tokenizer.convert_tokens_to_ids(site.value)
            assert labels[i, site.predict] == ids[i, site.token]


def test_qa_inputs_and_concept_sites(samples, tokenizer):
    for key in shapes.QUESTIONS:
        inp = shapes.qa_inputs(samples[:16], tokenizer, key)
        ids, labels = inp["input_ids"], inp["labels"]
        assert ((ids == shapes.IMAGE).sum(1) == shapes.N_PATCHES).all()
        for i, s in enumerate(samples[:16]):
            answer = labels[i][labels[i] != -100].tolist()
            assert tokenizer.decode(answer[:-1]) == s.answer(key) and answer[-1] == shapes.EOS
            for site in shapes.concept_sites(s, key):
                assert ids[i, site.token] == tokenizer.convert_tokens_to_ids(site.value)
        prompts = shapes.qa_inputs(samples[:4], tokenizer, [key, "count", "color", "size"], labels=False)
        assert "labels" not in prompts and (prompts["input_ids"][:, -1] == tokenizer.convert_tokens_to_ids("?")).all()
