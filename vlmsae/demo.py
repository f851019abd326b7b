"""``vlmsae demo``: the whole pipeline on a model that really sees, end to end.

With no arguments: the shipped Shapes captioner (a ViT-GPT2 trained by ``vlmsae.testbed``). An
SAE trains online on a middle decoder layer while the model reads Shapes images; it is evaluated
(FVU, L0, dead fraction, loss recovered), its features are named by concept AUROC, a colour
feature steers captions, and an SAE folder plus a self-contained HTML report are written.

With ``--model`` and ``--images`` the same pipeline runs on your model and data (no ground truth,
so no concept naming or steering score).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from . import shapes
from .adapters import layers
from .concepts import concept_auroc, site_latents, steering_success
from .data import ImageTextFolder, ShapesData, hf_processor
from .evaluate import evaluate
from .files import write_text_atomic
from .interventions import latent_stats
from .sae import SAE
from .train import train

EVAL_SEED, CONCEPT_SEED, CALIBRATE_SEED, STEER_SEED = 30_000_000, 40_000_000, 50_000_000, 60_000_000


@dataclass
class DemoConfig:
    """Settings of ``vlmsae demo``; the defaults are the full run, ``quick()`` a shortened one for CI."""

    out: str = "vlmsae-demo"
    """Folder for the SAE and the report."""
    steps: int = 800
    """SAE training steps."""
    batch_size: int = 1024
    """Tokens per SAE step."""
    buffer_size: int = 16384
    """Rows of the ring buffer."""
    expansion: int = 4
    """d_sae / d_model (4 gave single features for every colour and shape at AUROC >= 0.98; 8 split them more)."""
    k: int = 8
    """Latents per token (TopK)."""
    layer: int | None = None
    """Decoder layer; None: the middle one."""
    data_batch: int = 64
    """Images per model forward."""
    eval_batches: int = 4
    """Batches of fresh images for evaluate()."""
    concept_samples: int = 400
    """Fresh images for concept AUROC."""
    steer_samples: int = 64
    """Fresh images per colour for steering success (after calibrating on as many others)."""
    strengths: tuple[float, ...] = (4.0, 8.0, 16.0)
    """Steering strengths to calibrate over, as multiples of the feature's typical activation."""
    seed: int = 0

    @classmethod
    def quick(cls, out: str = "vlmsae-demo") -> "DemoConfig":
        return cls(out=out, steps=150, buffer_size=8192, concept_samples=120, steer_samples=24, strengths=(8.0,))


def run(cfg: DemoConfig, *, model_name: str | None = None, images: str | None = None) -> dict:
    """Run the demo; returns its summary (also printed, and written into the report)."""
    from . import testbed

    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if model_name is None:
        model, tokenizer = testbed.load_captioner()
        data = ShapesData(tokenizer, batches=100_000, batch_size=cfg.data_batch)
        eval_data = ShapesData(tokenizer, batches=cfg.eval_batches, batch_size=cfg.data_batch, seed=EVAL_SEED)
    else:
        from .adapters import load_model

        if images is None:
            raise ValueError("--model needs --images, a folder of images with a captions table")
        model, tokenizer = load_model(model_name), None
        data = ImageTextFolder(images, hf_processor(model), batch_size=cfg.data_batch)
        eval_data = data
    info = layers(model)
    layer = cfg.layer if cfg.layer is not None else info.n_layers // 2
    sae = SAE(d_in=info.d_model, d_sae=cfg.expansion * info.d_model, k=cfg.k)
    history: list[dict] = []
    print(f"training a TopK SAE ({info.d_model} -> {sae.cfg.d_sae}, k={cfg.k}) on layer {layer} of the "
          f"{info.family} model, {cfg.steps} steps of {cfg.batch_size} tokens")
    train(model, layer, data, sae, steps=cfg.steps, batch_size=cfg.batch_size, buffer_size=cfg.buffer_size,
          k_start=4 * cfg.k, warmup_steps=min(50, cfg.steps // 10), sync_every=25, history=history, seed=cfg.seed)
    sae.save(out / "sae")
    print("evaluating: loss recovered, KL, FVU, L0")
    table = evaluate(model, layer, sae, eval_data, where=["all"])
    stats = latent_stats(model, layer, sae, eval_data)
    summary = {"model": type(model).__name__, "layer": layer, "d_sae": sae.cfg.d_sae, "k": cfg.k,
               "steps": cfg.steps, "fvu": table.loc["all", "fvu"], "l0": table.loc["all", "l0"],
               "dead_fraction": float((stats.density == 0).float().mean()),
               "loss_recovered": table.loc["all", "loss_recovered"], "kl": table.loc["all", "kl"]}
    concepts = steering = None
    example = None
    if model_name is None:
        print("naming features by concept AUROC")
        samples = shapes.make_samples(cfg.concept_samples, CONCEPT_SEED)
        concepts = concept_auroc(model, layer, sae, tokenizer, samples)
        summary["concepts_above_0.9"] = float((concepts["auroc"] > 0.9).mean())
        for concept in ("color", "shape"):
            summary[f"min_auroc_{concept}"] = float(concepts.loc[concept, "auroc"].min())
        print("steering captions with colour features")
        steering, example = _steer_colours(model, tokenizer, layer, sae, concepts, cfg)
        summary["steering_success_color"] = float(steering["success"].mean())
    summary["seconds"] = time.perf_counter() - t0
    _write_report(out / "report.html", summary, history, table, concepts, steering, example, cfg)
    write_text_atomic(out / "summary.json", pd.Series(summary).to_json(indent=1))
    print(pd.Series(summary).to_string())
    if concepts is not None:
        print(concepts.to_string())
    if steering is not None:
        print(steering.to_string())
    if example is not None:
        print(f"\nsteered toward {example['value']!r}:\n  before: {example['before']}\n  after:  {example['after']}")
    print(f"\nwrote {out / 'sae'} and {out / 'report.html'}")
    return summary


def _steer_colours(model, tokenizer, layer, sae, concepts, cfg):
    """Per colour: its best feature, a strength calibrated on some images, success on fresh ones."""
    calib = shapes.make_samples(cfg.steer_samples, CALIBRATE_SEED)
    fresh = shapes.make_samples(cfg.steer_samples, STEER_SEED)
    latents, sites = site_latents(model, layer, sae, tokenizer, calib)
    rows, example = [], None
    for value in shapes.COLORS:
        feature = int(concepts.loc[("color", value), "feature"])
        on = latents[(sites["value"] == value).to_numpy(), feature]
        typical = float(on[on > 0].mean()) if (on > 0).any() else 1.0
        best = max(cfg.strengths, key=lambda m: steering_success(
            model, tokenizer, layer, sae, calib, concept="color", value=value, features=[feature],
            strength=m * typical)[0])
        success, table = steering_success(model, tokenizer, layer, sae, fresh, concept="color", value=value,
                                          features=[feature], strength=best * typical)
        rows.append({"value": value, "feature": feature, "strength": best * typical, "multiple": best,
                     "success": success, "images": len(table)})
        if example is None and len(table):
            example = {"value": value, "before": table["before"].iloc[0], "after": table["after"].iloc[0]}
    return pd.DataFrame(rows).set_index("value"), example


def _write_report(path: Path, summary, history, table, concepts, steering, example, cfg) -> None:
    import plotly.graph_objects as go

    figures = []
    if history:
        h = pd.DataFrame(history)
        fig = go.Figure([go.Scatter(x=h["step"], y=h[m], name=m) for m in ("fvu", "dead_fraction")])
        fig.update_layout(title="training", xaxis_title="step", yaxis_title="value")
        figures.append(fig)
    if concepts is not None:
        c = concepts.reset_index()
        fig = go.Figure(go.Bar(x=c["concept"] + ": " + c["value"], y=c["auroc"],
                               text=[f"#{f}" for f in c["feature"]]))
        fig.update_layout(title="best feature per concept value", xaxis_title="concept value",
                          yaxis_title="AUROC", yaxis_range=[0.5, 1])
        figures.append(fig)
    if steering is not None:
        fig = go.Figure(go.Bar(x=steering.index, y=steering["success"]))
        fig.update_layout(title="steering success per colour", xaxis_title="colour", yaxis_title="success rate",
                          yaxis_range=[0, 1])
        figures.append(fig)
    parts = [f"<h1>vlmsae demo</h1><h2>summary</h2>{pd.Series(summary).to_frame('value').to_html()}",
             f"<h2>evaluate()</h2>{table.to_html()}"]
    if example is not None:
        parts.append(f"<h2>steering toward {example['value']}</h2><p>before: {example['before']}<br>"
                     f"after: {example['after']}</p>")
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False))
    if concepts is not None:
        parts.append(f"<h2>concept AUROC</h2>{concepts.to_html()}")
    parts.append(f"<h2>settings</h2><pre>{asdict(cfg)}</pre>")
    html = "<!doctype html><html><head><meta charset='utf-8'><title>vlmsae demo</title></head><body>" \
           + "\n".join(parts) + "</body></html>"
    write_text_atomic(path, html)
