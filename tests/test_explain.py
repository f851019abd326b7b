"""vlmsae.explain (issue 16): labels from an explainer's answers about top and non-firing images, detection scores.

The scans here are built by hand from Shapes ground truth (a latent that fires where the image holds a red object,
or on the patches of the red object), and the reference explainer answers from that ground truth, so that every
expected label and score is known without the code under test. The shipped QA model as explainer on a trained
SAE is checked in tests/test_concepts.py (the demo's labels against the truth)."""

import numpy as np
import pandas as pd
import pytest
import torch

from vlmsae.analysis import PatchLayout, Scan, TopExamples
from vlmsae.errors import ConfigError
from vlmsae.explain import explain, focus, phrases, score_detection
from vlmsae.plots import to_rgb
from vlmsae.testbed import shapes
from vlmsae.testbed.explain import ShapesQAExplainer, label_agreement

SAMPLES = shapes.make_samples(120, 7)
IMAGES = [s.image for s in SAMPLES]
GRID = shapes.IMAGE_SIZE // shapes.PATCH  # 6 x 6 patches


class Oracle:
    """Answers from the ground truth of the image it is shown (found by its pixels); a focused image (other
    objects painted over) is answered about the objects still fully in view. Counts what it was asked."""

    questions = {"scene": "what is the background?", "color": "what color?", "shape": "what shape?"}

    def __init__(self):
        self.by_pixels = {to_rgb(s.image).tobytes(): s for s in SAMPLES}
        self.asked = 0

    def ask(self, images, question):
        self.asked += len(images)
        out = []
        for image in images:
            sample = self.by_pixels.get(image.tobytes())
            objects = sample.objects if sample is not None else next(o for o in map(
                lambda s: in_view(s, image), SAMPLES) if o)  # a focused image: its source's objects in view
            out.append("grey" if question == "scene" else " and ".join(o.value(question) for o in objects))
        return out


def in_view(sample, image):
    """The objects of ``sample`` whose every pixel ``image`` shows unchanged."""
    full = to_rgb(sample.image)
    return [o for o, m in zip(sample.objects, sample.masks) if (image[m] == full[m]).all()]


def has(sample, concept, value):
    return any(o.value(concept) == value for o in sample.objects)


def hand_scan(latent_values: dict[int, tuple[str, str]], n_top=8, heat=False) -> Scan:
    """A scan whose latent L fires (activation 1 + a little per example) on the samples holding its value; with
    ``heat``, only on the patches of the objects with that value."""
    latents = sorted(latent_values)
    n = len(SAMPLES)
    peaks = torch.zeros(len(latents), n)
    heats = torch.zeros(len(latents), n, GRID * GRID)
    for row, latent in enumerate(latents):
        concept, value = latent_values[latent]
        for i, s in enumerate(SAMPLES):
            if has(s, concept, value):
                peaks[row, i] = 1 + i / n
                cover = s.patch_coverage(shapes.PATCH)
                mine = [j for j, o in enumerate(s.objects) if o.value(concept) == value]
                heats[row, i] = torch.from_numpy(cover[mine].sum(0).reshape(-1)).float() * peaks[row, i]
    values, example = peaks.topk(n_top, dim=1)
    values = torch.where(values > 0, values, float("-inf"))
    example = torch.where(values > 0, example, -1)
    f = len(latents)
    # the window around each peak: (example, 1000 + latent, -1 past the end)
    tokens = torch.stack([example, 1000 + torch.tensor(latents)[:, None].expand(-1, n_top),
                          torch.full((f, n_top), -1)], -1)
    top = TopExamples(latents=torch.tensor(latents), values=values, example=example,
                      position=torch.zeros(f, n_top, dtype=torch.long), tokens=tokens,
                      token_acts=torch.zeros(f, n_top, 3),
                      image_acts=heats.gather(1, example.clamp_min(0)[..., None].expand(-1, -1, GRID * GRID))
                      if heat else None,
                      layout=PatchLayout((GRID, GRID), 1) if heat else None)
    zeros = torch.zeros(max(latents) + 1)
    return Scan(tokens=n, fired=zeros.long(), fired_image=zeros.long(), total=zeros, max=zeros,
                l0_counts=torch.zeros(1, 1, dtype=torch.long), top=top, peaks=peaks)


def test_phrases_split_answers_into_what_they_name():
    assert phrases("red and blue") == {"red", "blue"}
    assert phrases("A red circle, and the big blue square.") == {"red circle", "big blue square"}
    assert phrases("top left and bottom right") == {"top left", "bottom right"}
    assert phrases("") == set()


def test_focus_keeps_the_box_around_the_hot_patches_and_paints_the_rest():
    index = np.arange(48 * 48 * 3).reshape(48, 48, 3)
    image = np.where(index % 7 == 0, 250, index % 13).astype(np.uint8)  # median 6, mean about 41
    heat = torch.zeros(6, 6)
    heat[2, 3], heat[3, 3], heat[0, 0] = 4.0, 2.0, 1.0  # (0, 0) is below half the peak: left out
    out = focus(image, heat)
    box = np.zeros((48, 48), dtype=bool)
    box[8:40, 16:40] = True  # patch rows 1..4, cols 2..4 (one patch around rows 2-3, col 3)
    assert (out[box] == image[box]).all()
    fill = np.median(image.reshape(-1, 3), axis=0).astype(np.uint8)
    assert (out[~box] == fill).all()
    assert focus(image, torch.zeros(6, 6)) is image  # nothing hot: the whole image


def test_explain_names_the_value_the_top_images_share_and_detection_separates_right_from_wrong():
    truth = {3: ("color", "red"), 9: ("shape", "circle"), 11: ("color", "blue")}
    found = hand_scan(truth)
    oracle = Oracle()
    table = explain(found, IMAGES, oracle, n_top=8, n_negative=8, progress=False)
    assert table.loc[3, "label"] == "color: red" and table.loc[9, "label"] == "shape: circle"
    assert table.loc[11, "label"] == "color: blue"
    for latent, (concept, value) in truth.items():
        row = table.loc[latent]
        assert row["top_share"] == 1.0 and row["negative_share"] == 0.0 and row["contrast"] == 1.0
        assert len(row["examples"]) == 8 and len(row["negatives"]) == 8
        assert not any(has(SAMPLES[e], concept, value) for e in row["negatives"])
        assert {t["question"] for t in row["transcript"]} == {"scene", "color", "shape"}
        assert len(row["transcript"]) == 3 * 16
        assert not row["focused"]
    # an image is asked each question once, whatever latents share it; "grey", named by every image, is no label
    seen = {e for latent in truth for e in (*table.loc[latent, "examples"], *table.loc[latent, "negatives"])}
    assert oracle.asked == 3 * len(seen)

    right = score_detection(table, found, IMAGES, oracle, n=16, progress=False)
    assert (right["detection"] == 1.0).all() and (right["n_firing"] == 16).all() and (right["n_silent"] == 16).all()
    for latent, (concept, value) in truth.items():  # held out: none of the examples the label was made from
        shown = {*table.loc[latent, "examples"], *table.loc[latent, "negatives"]}
        assert not shown & {*right.loc[latent, "firing"], *right.loc[latent, "silent"]}
        assert all(has(SAMPLES[e], concept, value) for e in right.loc[latent, "firing"])
        assert not any(has(SAMPLES[e], concept, value) for e in right.loc[latent, "silent"])
    wrong = {3: ("shape", "circle"), 9: ("color", "blue"), 11: ("color", "red")}
    scores = score_detection(table, found, IMAGES, oracle, n=16, labels=wrong, progress=False)
    assert (scores["detection"] < 0.8).all()
    assert scores.loc[3, "label"] == "shape: circle"


def test_heatmaps_focus_the_top_images_on_the_firing_object():
    """A latent firing on the red object's patches: the focused images show only red objects, so the label is
    red, and the other objects' colours (named in the whole images) do not dilute it."""
    found = hand_scan({5: ("color", "red")}, heat=True)
    table = explain(found, IMAGES, Oracle(), n_top=8, n_negative=8, progress=False)
    row = table.loc[5]
    assert row["focused"] and row["label"] == "color: red"
    focused = [phrases(t["answer"]) for t in row["transcript"] if t["question"] == "color" and t["focused"]]
    whole = explain(found, IMAGES, Oracle(), n_top=8, n_negative=8, use_focus=False, progress=False)
    named = [phrases(t["answer"]) for t in whole.loc[5, "transcript"] if t["question"] == "color"][:8]
    assert len(focused) == len(named) == 8 and all("red" in p for p in focused + named)
    others = lambda answers: sum(len(p - {"red"}) for p in answers)  # noqa: E731
    # the box around two red objects may hold a third: focusing leaves fewer other colours, not always none
    assert others(focused) < others(named) / 2 and sum(p == {"red"} for p in focused) >= 6


def test_bad_input_is_a_clear_error():
    found = hand_scan({3: ("color", "red")})
    with pytest.raises(ConfigError, match="peaks=True"):
        explain(Scan(**{**found.__dict__, "peaks": None}), IMAGES, Oracle(), progress=False)
    with pytest.raises(ConfigError, match="n_top=0"):
        explain(found, IMAGES, Oracle(), n_top=0, progress=False)
    with pytest.raises(ConfigError, match="latent 4 was not scanned"):
        explain(found, IMAGES, Oracle(), latents=[4], progress=False)
    with pytest.raises(ConfigError, match="has no image: images holds 10"):
        explain(found, IMAGES[:10], Oracle(), progress=False)
    table = explain(found, IMAGES, Oracle(), progress=False)
    with pytest.raises(ConfigError, match="'size' of latent 3 is not one of the explainer's"):
        score_detection(table, found, IMAGES, Oracle(), labels={3: ("size", "small")}, progress=False)

    class Mute(Oracle):
        def ask(self, images, question):
            return []
    with pytest.raises(ConfigError, match="gave 0 answers for"):
        explain(found, IMAGES, Mute(), progress=False)


def test_the_shapes_qa_explainer_answers_as_the_truth_says():
    qa = ShapesQAExplainer()
    images = [to_rgb(s.image) for s in SAMPLES[:40]]
    for key in ("color", "shape", "count"):
        answers = qa.ask(images, key)
        assert np.mean([a == s.answer(key) for a, s in zip(answers, SAMPLES[:40])]) >= 0.9, key
    with pytest.raises(ConfigError, match="not one of the Shapes QA model's"):
        qa.ask(images, "mood")
    with pytest.raises(ConfigError, match=r"an image of shape \(32, 32, 3\)"):
        qa.ask([np.zeros((32, 32, 3), dtype=np.uint8)], "color")


def test_label_agreement_checks_each_best_latent_against_its_value():
    concepts = pd.DataFrame({"latent": [3, 9], "auroc": [0.99, 0.97]},
                            index=pd.MultiIndex.from_tuples([("color", "red"), ("shape", "circle")],
                                                            names=["concept", "value"]))
    table = pd.DataFrame({"label": ["color: red", "color: blue"]}, index=pd.Index([3, 9], name="latent"))
    agreement = label_agreement(table, concepts)
    assert agreement["right"].tolist() == [True, False]
    with pytest.raises(ConfigError, match="latent 9 .* was not explained"):
        label_agreement(table.loc[[3]], concepts)


def test_localisation_scores_the_heatmap_against_the_labelled_objects():
    from vlmsae.testbed.explain import score_localisation

    found = hand_scan({5: ("color", "red"), 6: ("shape", "circle")}, heat=True)
    table = explain(found, IMAGES, Oracle(), n_top=8, n_negative=8, progress=False)
    assert list(table["label"]) == ["color: red", "shape: circle"]
    right = score_localisation(table, found, SAMPLES)
    assert (right == 1.0).all()  # the heat is exactly the labelled objects' coverage
    table.loc[5, "phrase"], table.loc[6, "question"], table.loc[6, "phrase"] = "blue", "color", "green"
    wrong = score_localisation(table, found, SAMPLES)
    assert (wrong < 0.75).all()
    assert score_localisation(table, hand_scan({5: ("color", "red"), 6: ("shape", "circle")}), SAMPLES).isna().all()


def test_an_explainer_that_reads_context_gets_the_text_around_each_peak():
    """Top examples come with the window around the latent's peak, the peak in [[ ]]; non-firing ones and the
    held-out images of scoring with none. Two latents sharing an image each ask with their own context."""

    class Reader(Oracle):
        reads_context = True

        def __init__(self):
            super().__init__()
            self.seen = []

        def ask(self, images, question, contexts=None):
            self.seen += [(question, c) for c in contexts]
            return super().ask(images, question)

    reader = Reader()
    found = hand_scan({3: ("color", "red"), 9: ("shape", "circle")})
    table = explain(found, IMAGES, reader, n_top=8, n_negative=8, progress=False)
    assert table.loc[3, "label"] == "color: red"
    for latent in (3, 9):
        turns = [t for t in table.loc[latent, "transcript"] if t["question"] == "color"]
        top = [t for t in turns if t["context"] is not None]
        assert [t["context"] for t in top] == [f"{e} [[{1000 + latent}]]" for e in table.loc[latent, "examples"]]
        assert all(("color", t["context"]) in reader.seen for t in top)
        assert len(turns) - len(top) == 8  # the non-firing ones
    shared = set(table.loc[3, "examples"]) & set(table.loc[9, "examples"])
    assert shared  # asked twice, once per latent's context
    assert all(sum(c == f"{e} [[{1000 + L}]]" for q, c in reader.seen if q == "color") == 1
               for e in shared for L in (3, 9))
    before = len(reader.seen)
    score_detection(table, found, IMAGES, reader, n=4, progress=False)
    assert reader.seen[before:] and all(c is None for _, c in reader.seen[before:])


def test_boxes_named_by_the_explainer_score_the_heatmap():
    """Without masks: an explainer that names the labelled object's box (here from the truth) scores the heatmap
    near 1, one that names the opposite corner far lower; answers without four numbers are skipped."""
    from vlmsae.explain import parse_box, score_boxes

    assert parse_box("the box is 0.1 0.2 0.5 0.6.") == (0.1, 0.2, 0.5, 0.6)
    assert parse_box("[50, 20, 10, 80]") == (0.1, 0.2, 0.5, 0.8)  # percent, corners in any order
    assert parse_box("top left") is None and parse_box("0.3 0.3 0.3 0.9") is None

    class Boxer(Oracle):
        def __init__(self, flip):
            super().__init__()
            self.flip = flip

        def locate(self, images, phrase):
            out = []
            for image in images:
                sample = self.by_pixels[image.tobytes()]
                masks = [m for o, m in zip(sample.objects, sample.masks) if o.color == phrase]
                ys, xs = np.nonzero(np.any(masks, axis=0))
                box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / shapes.IMAGE_SIZE
                out.append(" ".join(f"{v:.3f}" for v in (1 - box[[2, 3, 0, 1]] if self.flip else box)))
            return out

    found = hand_scan({5: ("color", "red")}, heat=True)
    table = explain(found, IMAGES, Oracle(), n_top=8, n_negative=8, use_focus=False, progress=False)
    right = score_boxes(table, found, IMAGES, Boxer(flip=False))
    wrong = score_boxes(table, found, IMAGES, Boxer(flip=True))
    assert right[5] >= 0.8 and wrong[5] < right[5] - 0.3  # patches at the box edge: centre out, object in
    assert score_boxes(table, found, IMAGES, Oracle()).isna().all()  # an explainer that cannot name boxes
