"""Every figure function on real recorded data: the expected traces and axis titles."""

import functools

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import vlmsae
from vlmsae import Kind, plots
from vlmsae.analysis import concept_aurocs, latent_table, image_question_grid, scan
from vlmsae.probes import compare_probes
from vlmsae.trainer import SAETrainer
from vlmsae.zoo import build_inputs, tiny_inputs, tiny_model

LAYER = 1


@functools.cache
def _setup():
    """A tiny LLaVA, an SAE trained briefly on its layer-1 residual, a scan over a few batches."""
    torch.manual_seed(0)
    model = tiny_model("llava", n_layers=2)
    data = [tiny_inputs(model, 4, seed=s) for s in range(4)]
    acts, kinds = [], []
    for batch in data:
        with vlmsae.record(model, [LAYER], stop=True) as rec:
            model(**batch)
        acts.append(rec[LAYER][rec.kinds(LAYER) != Kind.PAD])
        kinds.append(rec.kinds(LAYER)[rec.kinds(LAYER) != Kind.PAD])
    acts, kinds = torch.cat(acts), torch.cat(kinds)
    sae = vlmsae.SAE(d_in=64, d_sae=128, k=8)
    trainer = SAETrainer(sae, sync_every=5)
    for step in range(40):
        trainer.step(acts[torch.randperm(len(acts))[:64]])
    sae.eval()
    found = scan(model, LAYER, sae, data, n_examples=4)
    images = torch.cat([(b["pixel_values"] + 1) / 2 for b in data])  # back to [0, 1]
    return model, sae, data, acts, kinds, trainer.history, found, images


def axis_titles(fig: go.Figure) -> set[str]:
    axes = [fig.layout[name] for name in fig.layout if name.startswith(("xaxis", "yaxis"))]
    return {axis.title.text for axis in axes if axis.title.text}


def trace_types(fig: go.Figure) -> list[str]:
    return [t.type for t in fig.data]


def test_density_histogram():
    *_, found, _ = _setup()
    fig = plots.density_histogram(latent_table(found))
    assert trace_types(fig) == ["histogram"]
    assert len(fig.data[0].x) == int((found.fired > 0).sum())
    assert axis_titles(fig) == {"log10 firing density", "latents"}


def test_l0_by_kind():
    *_, found, _ = _setup()
    fig = plots.l0_by_kind(found)
    names = [t.name.split()[0] for t in fig.data]
    assert names == ["special", "image", "text"]
    assert trace_types(fig) == ["bar"] * 3
    for trace in fig.data:
        assert abs(sum(trace.y) - 1) < 1e-9
    assert axis_titles(fig) == {"L0 (latents active at a position)", "share of positions"}


def test_training_curves():
    history = _setup()[5]
    fig = plots.training_curves(history)
    assert trace_types(fig) == ["scatter"] * 4
    assert [t.name for t in fig.data] == ["loss", "FVU", "L0", "dead fraction"]
    assert list(fig.data[0].x) == [m.step for m in history] and len(history) == 8
    assert axis_titles(fig) == {"step", "loss", "FVU", "L0", "dead fraction"}
    assert history[-1].dead_window == 2560  # the dead window (every token of this short run), in the panel's title
    assert fig.layout.annotations[3].text == "dead fraction (silent for 2560 tokens)"
    assert list(plots.training_curves(pd.DataFrame([vars(m) for m in history])).data[1].y) == list(fig.data[1].y)


def test_top_images_with_heatmaps():
    *_, found, images = _setup()
    table = latent_table(found)
    feature = int(table.query("not dead")["density"].idxmax())
    fig = plots.top_images(found.top, feature, images, n=3)
    assert trace_types(fig) == ["image", "heatmap"] * 3
    heat = fig.data[1]
    assert len(heat.z) == 4 and heat.dx == 8  # a 4x4 patch grid over 32-pixel images
    assert fig.data[0].z.shape == (32, 32, 3)
    assert "x (pixels)" in axis_titles(fig)
    with pytest.raises(vlmsae.ConfigError, match="never fired"):
        dead = table.query("dead").index
        plots.top_images(found.top, int(dead[0]) if len(dead) else -1, images)


def test_image_question_grid():
    model, sae, *_ = _setup()
    images = _setup()[7][:4]
    questions = ["7 8 9", "20 21", "50 51 52"]

    def inputs(chunk, question):
        return build_inputs(model, chunk, [[int(w) for w in question.split()]] * len(chunk))

    grid = image_question_grid(model, LAYER, sae, images, questions, inputs, latents=[0, 1, 2], where="text")
    fig = plots.image_question_grid(grid, 1)
    assert trace_types(fig) == ["heatmap"]
    assert list(fig.data[0].x) == questions and len(fig.data[0].y) == 4
    assert axis_titles(fig) == {"question", "image"}


def test_evaluation():
    model, sae, data, *_ = _setup()
    table = vlmsae.evaluate(model, LAYER, sae, data[:1])
    fig = plots.evaluation(table)
    assert [t.name for t in fig.data] == ["clean", "spliced", "mean-ablated", "zero-ablated"]
    assert list(fig.data[0].x) == ["all", "image", "text"]
    assert axis_titles(fig) == {"spliced positions", "cross-entropy (nats)"}
    assert "loss recovered" in fig.layout.title.text


def test_steering_before_after():
    model, sae, data, *_ = _setup()
    batch = tiny_inputs(model, 3, padding="left", seed=9)
    prompt = batch["input_ids"].shape[1]

    def words(out):
        return [" ".join(str(int(t)) for t in row[prompt:]) for row in out]

    with torch.no_grad():
        before = words(model.generate(**batch, max_new_tokens=4, do_sample=False))
        with vlmsae.steer(model, LAYER, sae, {5: 40.0}):
            after = words(model.generate(**batch, max_new_tokens=4, do_sample=False))
    vocab = sorted({w for text in before + after for w in text.split()})
    fig = plots.steering(before, after, vocab)
    assert trace_types(fig) == ["table", "bar", "bar"]
    assert list(fig.data[0].cells.values[0]) == before
    assert sum(fig.data[1].y) >= len(before)
    assert axis_titles(fig) == {"word", "outputs containing it"}


def test_auroc_matrix_and_probes():
    _, sae, _, acts, kinds, *_ = _setup()
    with torch.no_grad():
        latents = sae.encode(acts)
    names = pd.Series([Kind(int(k)).name.lower() for k in kinds])
    table = concept_aurocs(latents, names, pd.Series(["kind"] * len(names)))
    fig = plots.auroc_matrix(table)
    assert trace_types(fig) == ["heatmap"]
    assert list(fig.data[0].y) == ["kind=image", "kind=special", "kind=text"]
    assert axis_titles(fig) == {"latent", "concept"}
    probes = compare_probes({"sae": latents, "resid": acts}, {"kind": names})
    fig = plots.probe_accuracy(probes)
    assert [t.name for t in fig.data] == ["sae", "resid", "chance"]
    assert axis_titles(fig) == {"concept", "held-out accuracy"}
    assert probes.loc["kind", "resid"] > probes.loc["kind", "chance"]
