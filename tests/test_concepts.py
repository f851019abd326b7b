"""Concept metrics: AUROC is exact; the demo's SAE on the shipped captioner finds and steers concepts."""

import itertools

import pytest
import torch

from vlmsae.metrics import auroc


def brute_auroc(pos, neg):
    wins = [(1.0 if p > n else 0.5 if p == n else 0.0) for p, n in itertools.product(pos.tolist(), neg.tolist())]
    return sum(wins) / len(wins)


def test_auroc_matches_pairwise_counting_with_ties():
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 4, (37, 5), generator=g).float()  # many ties, like sparse latents
    neg = torch.randint(0, 3, (23, 5), generator=g).float()
    got = auroc(pos, neg)
    for f in range(5):
        assert got[f].item() == pytest.approx(brute_auroc(pos[:, f], neg[:, f]))
    assert auroc(torch.ones(3, 1), torch.zeros(4, 1)).item() == 1.0
    assert auroc(torch.zeros(3, 1), torch.zeros(4, 1)).item() == 0.5


@pytest.fixture(scope="module")
def demo_summary(tmp_path_factory):
    """The demo's default settings on the shipped captioner, run once for the figures below."""
    from vlmsae.testbed.demo import DemoConfig, run

    out = tmp_path_factory.mktemp("demo")
    summary = run(DemoConfig(out=str(out)))
    summary["out"] = out
    return summary


def test_demo_saes_recover_loss_and_steer_colours(demo_summary):
    table = demo_summary["table"]
    print(f"\n{table[['loss_recovered', 'steering_success_color']].to_string()}\n{demo_summary['seconds']:.0f} s")
    assert list(table.index) == [2, 3]  # the middle decoder layer of four, and the last
    assert (table["loss_recovered"] >= 0.9).all()
    assert (table["steering_success_color"] >= 0.8).all()
    out = demo_summary["out"]
    assert (out / "report.html").stat().st_size > 100_000  # plotly inlined: opens with no network
    import re

    before, after = re.search(r"<p>before: (.*?)<br>after: (.*?)</p>", (out / "report.html").read_text()).groups()
    assert before != after  # the report's example is a caption the steering changed
    from vlmsae import SAE

    for layer in table.index:
        assert SAE.load(out / "sae" / f"L{layer}").metadata["hook_name"] == f"blocks.{layer}.hook_resid_post"


def test_demo_sae_has_a_feature_per_colour_and_shape(demo_summary):
    """The bar holds at the last layer. At the middle layer one colour is often carried by the absence of
    the other colours' features (best single feature 0.83-0.94 in 9 of 13 SAE seeds and settings), so that
    layer's figures are printed, not asserted."""
    table = demo_summary["table"]
    print(f"\n{table[['min_auroc_color', 'min_auroc_shape', 'concepts_above_0.9']].to_string()}")
    last = table.loc[table.index.max()]
    assert last["min_auroc_color"] >= 0.95
    assert last["min_auroc_shape"] >= 0.95


def test_demo_labels_name_the_concept_of_each_best_latent(demo_summary):
    """Issue 16: the Shapes QA model, shown each colour's and shape's best latent's top images and some where it
    does not fire, labels it with that colour or shape (the truth) in at least 90% of cases at the last layer, and
    a label picks held-out firing images better than another latent's label does (measured 2026-11-30, 1x k 16:
    0.72 / 0.77 against 0.58 / 0.58 at layers 2 / 3; at 4x k 8: 0.86 / 0.85 against 0.45 / 0.59)."""
    table = demo_summary["table"]
    print(f"\n{table[['labels_right', 'detection', 'detection_shuffled']].to_string()}")
    last = table.loc[table.index.max()]
    assert last["labels_right"] >= 0.9
    assert (table["detection"] >= table["detection_shuffled"] + 0.1).all()
    page = (demo_summary["out"] / "report.html").read_text()
    assert "labels from the Shapes QA model" in page and page.count("data:image/png;base64") >= 8
    for layer in table.index:
        assert f"href='dashboard_L{layer}.html'" in page and (demo_summary["out"] / f"dashboard_L{layer}.html").is_file()


def test_demo_report_opens_in_a_browser_with_its_images(demo_summary, tmp_path):
    """The report and a layer's dashboard render in headless chromium with no console error, the report's label
    cards with their images, the dashboard with the labels."""
    from test_dashboard import CHROMIUM, browse

    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install -y chromium)")
    out = demo_summary["out"]
    dom, log = browse(out / "report.html", "", tmp_path)
    assert not [line for line in log.splitlines() if ":CONSOLE" in line]
    assert dom.count("class=\"card\"") == 8 * len(demo_summary["table"])  # each colour and shape, per layer
    assert dom.count("<img src=\"data:image/png;base64,") >= 8 * 4
    assert dom.count("class=\"plotly-graph-div") >= 3
    layer = int(demo_summary["table"].index.max())
    dom, log = browse(out / f"dashboard_L{layer}.html", "", tmp_path)
    assert not [line for line in log.splitlines() if ":CONSOLE" in line]
    assert 'data-ready="1"' in dom and "color: " in dom


def test_demo_report_screenshot_shows_its_images_and_fits_the_window(demo_summary, tmp_path):
    """A 1280 px screenshot of the report: no horizontal scroll, and at every <img>'s place on the page exactly the
    pixels of the image it embeds (the label cards' examples, drawn pixelated at their size); another image's
    pixels do not match there (the comparison can tell images apart)."""
    import numpy as np
    from PIL import Image
    from test_dashboard import CHROMIUM, screenshot

    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install -y chromium)")
    layout, shot, images = screenshot(demo_summary["out"] / "report.html", tmp_path)
    assert layout["scroll"] <= layout["client"], layout["scroll"]
    assert len(layout["images"]) == len(images) >= 8 * 4
    for i, ((left, top, width, height, decoded), image) in enumerate(zip(layout["images"], images)):
        assert decoded, i
        seen = shot.crop((round(left), round(top), round(left + width), round(top + height)))
        shown, other = (np.asarray(im.resize(seen.size, Image.NEAREST), dtype=float)
                        for im in (image, images[(i + 1) % len(images)]))
        seen = np.asarray(seen, dtype=float)
        assert np.abs(seen - shown).mean() < 2, (i, np.abs(seen - shown).mean())
        if not np.array_equal(shown, other):
            assert np.abs(seen - other).mean() > 5, i


def test_llava_image_token_features_localise_colours():
    import vlmsae
    from vlmsae import SAE, train
    from vlmsae.testbed import models, shapes
    from vlmsae.testbed.concepts import patch_auroc
    from vlmsae.testbed.data import ShapesData

    if not (models.QA_DIR / "config.json").exists():
        pytest.skip(f"the LLaVA Shapes model is not shipped at {models.QA_DIR}")
    model, tokenizer = models.load_qa()
    info = vlmsae.layers(model)
    # Colour lives in the image tokens early: measured min-over-colours patch AUROC with these settings was
    # 0.93 at layer 0, 0.94 at layer 1, 0.87 at layer 2, 0.91 at layer 3 of 4.
    layer = 1
    torch.manual_seed(0)
    sae = SAE(d_in=info.d_model, d_sae=8 * info.d_model, k=8)
    train(model, layer, ShapesData(tokenizer, batches=10_000, batch_size=32, question="color"), sae, steps=300,
          batch_size=1024, buffer_size=8192, kinds=("image",), k_start=32, warmup_steps=30, progress=False)
    table = patch_auroc(model, layer, sae, tokenizer, shapes.make_samples(200, 40_000_000))
    colours = table.loc["color"]
    print("\npatch AUROC of the best feature per colour:\n" + colours.to_string())
    assert (colours["auroc"] >= 0.9).all()
