"""``vlmsae demo``: the whole pipeline on a model that really sees, end to end.

With no arguments: the shipped Shapes captioner (a ViT-GPT2 trained by ``vlmsae.testbed.models``). SAEs
train online on a middle decoder layer and on the last one, both from the same forwards, while the
model reads Shapes images; each is evaluated (FVU, L0, dead fraction, loss recovered), its latents
are named by concept AUROC, the Shapes QA model labels each colour's and shape's best latent from its top
images (:mod:`vlmsae.explain`, scored by detection), colour latents steer captions, and SAE folders, a
dashboard per layer and a self-contained HTML report are written.

Why two layers: in the captioner a concept becomes one latent late. At the middle layer the
colour about to be written is often carried by the absence of the other colours' latents, so the
best single latent for one colour measured AUROC 0.76-0.95 in 22 of 30 runs over six TopK, BatchTopK and
Matryoshka settings and five seeds at 4x, k 8 (the colour changes with the seed; no architecture fixes it); at the
last layer every colour and shape had a latent at >= 0.977 in every run (benchmarks/RESULTS.md). The demo's
SAEs are 1x, k 16 since 2026-11-30 (no latent silent on the evaluation tokens; see ``DemoConfig.expansion``).

With ``--model`` and ``--images`` the same pipeline runs on your model and data (no ground truth,
so no concept naming or steering score).
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from ..adapters import layers, load_model, special_token_ids
from ..data import ImageTextFolder, hf_processor
from ..evaluate import evaluate
from ..files import write_text_atomic
from ..sae import SAE
from ..train import train
from . import shapes
from .concepts import concept_auroc, site_latents, steering_success
from .data import ShapesData
from .explain import ShapesQAExplainer, explain_concepts
from .models import load_captioner

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
    expansion: int = 1
    """d_sae / d_model. The captioner's decoder reads captions of a 30-word grammar: at 4x (k 8) a third of the
    latents were silent on the 4,464 evaluation tokens, at 1x with k 16 none, with a lower FVU (0.017 against 0.028)
    and every colour and shape latent as good or better (benchmarks/RESULTS.md, "Dead latents")."""
    k: int = 16
    """Latents per token (TopK)."""
    layers: tuple[int, ...] | None = None
    """Decoder layers, one SAE each, trained from the same forwards; None: the middle one and the last."""
    data_batch: int = 64
    """Images per model forward."""
    eval_batches: int = 4
    """Batches of fresh images for evaluate()."""
    concept_samples: int = 400
    """Fresh images for concept AUROC."""
    steer_samples: int = 64
    """Fresh images per colour for steering success (after calibrating on as many others)."""
    strengths: tuple[float, ...] = (4.0, 8.0, 16.0)
    """Steering strengths to calibrate over, as multiples of the latent's typical activation."""
    seed: int = 0

    @classmethod
    def quick(cls, out: str = "vlmsae-demo") -> "DemoConfig":
        return cls(out=out, steps=150, buffer_size=8192, concept_samples=120, steer_samples=24, strengths=(8.0,))


def run(cfg: DemoConfig, *, model_name: str | None = None, images: str | None = None) -> dict:
    """Run the demo; returns ``{"model", "seconds", "table"}``, ``table`` one row of figures per layer
    (also printed, written to ``summary.json`` and into the report)."""
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    if model_name is None:
        model, tokenizer = load_captioner()
        data = ShapesData(tokenizer, batches=100_000, batch_size=cfg.data_batch)
        eval_data = ShapesData(tokenizer, batches=cfg.eval_batches, batch_size=cfg.data_batch, seed=EVAL_SEED)
        special_ids = None
    else:
        if images is None:
            raise ValueError("--model needs --images, a folder of images with a captions table")
        model, tokenizer = load_model(model_name), None
        to_inputs = hf_processor(model)
        special_ids = special_token_ids(model, to_inputs.tokenizer)  # a chat template's control tokens too
        data = ImageTextFolder(images, to_inputs, batch_size=cfg.data_batch)
        eval_data = data
    info = layers(model)
    out = Path(cfg.out)  # made once the model and data are known good: a bad --model leaves nothing behind
    out.mkdir(parents=True, exist_ok=True)
    chosen = cfg.layers if cfg.layers is not None else sorted({info.n_layers // 2, info.n_layers - 1})
    saes = {L: SAE(d_in=info.d_model, d_sae=cfg.expansion * info.d_model, k=cfg.k) for L in chosen}
    history: list[dict] = []
    print(f"training TopK SAEs ({info.d_model} -> {cfg.expansion * info.d_model}, k={cfg.k}) on layers "
          f"{', '.join(map(str, chosen))} of the {info.family} model, {cfg.steps} steps of {cfg.batch_size} tokens")
    train(model, list(chosen), data, saes, steps=cfg.steps, batch_size=cfg.batch_size, buffer_size=cfg.buffer_size,
          k_start=4 * cfg.k, warmup_steps=min(50, cfg.steps // 10), sync_every=25, history=history, seed=cfg.seed,
          special_ids=special_ids, compute_dtype="float32")  # float32 selection: the same SAEs (and the figures
    # in benchmarks/RESULTS.md) on every CPU, whether or not it has the native bf16 that the default would use
    rows, concepts, steering, explained, example = {}, {}, {}, {}, None
    samples = shapes.make_samples(cfg.concept_samples, CONCEPT_SEED) if model_name is None else None
    explainer = ShapesQAExplainer() if samples is not None else None
    for L, sae in saes.items():
        sae.save(out / "sae" / f"L{L}")
        print(f"layer {L}: evaluating (loss recovered, KL, FVU, L0)")
        table = evaluate(model, L, sae, eval_data, where=["all"], special_ids=special_ids)
        row = {"fvu": table.loc["all", "fvu"], "l0": table.loc["all", "l0"],
               # dead: fired on none of the evaluated tokens (the one definition; its window beside it)
               "dead_fraction": table.loc["all", "dead"], "dead_window_tokens": int(table.loc["all", "spliced_tokens"]),
               "loss_recovered": table.loc["all", "loss_recovered"], "kl": table.loc["all", "kl"]}
        if samples is not None:
            print(f"layer {L}: naming latents by concept AUROC, steering captions with colour latents")
            concepts[L] = concept_auroc(model, L, sae, tokenizer, samples)
            row["concepts_above_0.9"] = float((concepts[L]["auroc"] > 0.9).mean())
            for concept in ("color", "shape"):
                row[f"min_auroc_{concept}"] = float(concepts[L].loc[concept, "auroc"].min())
            print(f"layer {L}: labelling the best colour and shape latents with the Shapes QA model")
            explained[L] = explain_concepts(model, L, sae, tokenizer, samples, concepts[L], explainer)
            scores = explained[L]["explanations"]
            row["labels_right"] = float(explained[L]["agreement"]["right"].mean())
            row["detection"] = float(scores["detection"].mean())
            row["detection_shuffled"] = float(scores["detection_shuffled"].mean())
            _write_layer_dashboard(out / f"dashboard_L{L}.html", model, L, sae, tokenizer, samples, explained[L])
            steering[L], first = _steer_colours(model, tokenizer, L, sae, concepts[L], cfg)
            row["steering_success_color"] = float(steering[L]["success"].mean())
            if first and (example is None or (first["success"] and not example["success"])):
                example = {"layer": L, **first}
        rows[L] = row
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("layer")
    summary = {"model": type(model).__name__, "d_sae": cfg.expansion * info.d_model, "k": cfg.k,
               "steps": cfg.steps, "seconds": time.perf_counter() - t0}
    _write_report(out / "report.html", summary, table, history, concepts, steering, example, cfg, explained)
    write_text_atomic(out / "summary.json", json.dumps({**summary, "layers": table.to_dict(orient="index")},
                                                       indent=1, default=float))
    print(pd.Series(summary).to_string())
    print(table.to_string(float_format="{:.4f}".format))
    for L in concepts:
        print(f"\nlayer {L}: best latent per concept value\n{concepts[L].to_string()}")
        if L in explained:
            print(f"\nlayer {L}: labels from the Shapes QA model\n{explained[L]['agreement'].to_string()}")
        print(f"\nlayer {L}: steering toward each colour\n{steering[L].to_string()}")
    if example is not None:
        print(f"\nlayer {example['layer']}, steered toward {example['value']!r}:\n  before: {example['before']}\n"
              f"  after:  {example['after']}")
    print(f"\nwrote {out / 'sae'}, {out / 'summary.json'}, the layers' dashboards and {out / 'report.html'}")
    return {**summary, "table": table}


def _steer_colours(model, tokenizer, layer, sae, concepts, cfg):
    """Per colour: its best latent, a strength calibrated on some images, success on fresh ones."""
    calib = shapes.make_samples(cfg.steer_samples, CALIBRATE_SEED)
    fresh = shapes.make_samples(cfg.steer_samples, STEER_SEED)
    latents, sites = site_latents(model, layer, sae, tokenizer, calib)
    rows, example = [], None
    for value in shapes.COLORS:
        latent = int(concepts.loc[("color", value), "latent"])
        on = latents[torch.tensor((sites["value"] == value).to_numpy()), latent]
        typical = float(on[on > 0].mean()) if (on > 0).any() else 1.0
        best = max(cfg.strengths, key=lambda m: steering_success(
            model, tokenizer, layer, sae, calib, concept="color", value=value, latents=[latent],
            strength=m * typical)[0])
        success, table = steering_success(model, tokenizer, layer, sae, fresh, concept="color", value=value,
                                          latents=[latent], strength=best * typical)
        rows.append({"value": value, "latent": latent, "strength": best * typical, "multiple": best,
                     "success": success, "images": len(table)})
        hits = table[table["success"]]
        if (example is None or not example["success"]) and len(table):  # a caption the steering changed, if any
            shown = (hits if len(hits) else table).iloc[0]
            example = {"value": value, "before": shown["before"], "after": shown["after"], "success": bool(len(hits))}
    return pd.DataFrame(rows).set_index("value"), example


def _write_layer_dashboard(path: Path, model, layer: int, sae, tokenizer, samples, found: dict) -> None:
    """Every latent's dashboard page (top images and tokens, statistics), with the explainer's labels."""
    from ..analysis import scan
    from ..dashboard import write_dashboard
    from .explain import captioner_batches

    full = scan(model, layer, sae, captioner_batches(samples, tokenizer), n_examples=6)
    labels = {int(latent): label for latent, label in found["explanations"]["label"].items() if label}
    write_dashboard(path, full, found["images"], tokenizer=tokenizer, labels=labels,
                    title=f"vlmsae demo: layer {layer}, {sae.cfg.d_sae} latents")


def _labels_html(layer: int, found: dict) -> str:
    """Per concept value: its best latent, the explainer's label (right or not), detection, and the latent's top
    images (the explainer saw these, with its answers in the image's title)."""
    from ..dashboard import png_data_uri

    explanations, agreement = found["explanations"], found["agreement"]
    cards = []
    for (concept, value), row in agreement.iterrows():
        latent = int(row["latent"])
        said = {}
        for turn in explanations.at[latent, "transcript"]:
            said.setdefault(turn["example"], [f"caption: {turn['context']}"] if turn["context"] else [])
            said[turn["example"]].append(f"{turn['prompt']} {turn['answer']}")
        images = "".join(
            f"<img src='{png_data_uri(found['images'][e])}' alt='example {e}' "
            f"title='{html.escape(chr(10).join(said.get(e, [])), quote=True)}'>"
            for e in explanations.at[latent, "examples"][:6])
        verdict = "right" if row["right"] else "wrong"
        cards.append(
            f"<div class='card'><b>{html.escape(concept)} {html.escape(value)}</b>: latent #{latent} (AUROC "
            f"{row['auroc']:.3f})<br>label <i>{html.escape(str(row['label']))}</i> ({verdict}), detection "
            f"{explanations.at[latent, 'detection']:.2f} (another latent's label: "
            f"{explanations.at[latent, 'detection_shuffled']:.2f})<div class='images'>{images}</div></div>")
    return (f"<h2>layer {layer}: labels from the Shapes QA model</h2><p>Each concept value's best latent, the label "
            "the QA model's answers about its top images give it, and how well that label picks held-out images "
            "where the latent fires from images where it does not (balanced accuracy; 0.5 is chance). Hover an "
            "image for the questions and answers.</p><div class='cards'>" + "".join(cards) + "</div>")


def _write_report(path: Path, summary, table, history, concepts, steering, example, cfg, explained=None) -> None:
    import plotly.graph_objects as go

    figures = []
    if history:
        h = pd.DataFrame(history)
        fig = go.Figure([go.Scatter(x=g["step"], y=g[m], name=f"layer {L}: {m}")
                         for L, g in h.groupby("layer") for m in ("fvu", "dead_fraction")])
        fig.update_layout(title="training (dead: fired on none of the last min(dead_tokens, tokens trained) tokens)",
                          xaxis_title=f"step ({cfg.batch_size} tokens each)", yaxis_title="FVU, dead fraction (fractions of 1)")
        figures.append(fig)
    if concepts:
        bars = []
        for L, c in concepts.items():
            c = c.reset_index()
            bars.append(go.Bar(x=c["concept"] + ": " + c["value"], y=c["auroc"], name=f"layer {L}",
                               text=[f"#{f}" for f in c["latent"]]))
        fig = go.Figure(bars)
        fig.update_layout(title="best latent per concept value", xaxis_title="concept value",
                          yaxis_title="AUROC", yaxis_range=[0.5, 1])
        figures.append(fig)
    if steering:
        fig = go.Figure([go.Bar(x=t.index, y=t["success"], name=f"layer {L}") for L, t in steering.items()])
        fig.update_layout(title="steering success per colour", xaxis_title="colour", yaxis_title="success rate",
                          yaxis_range=[0, 1])
        figures.append(fig)
    # Captions, concept names and settings are text: every one is escaped (pandas' to_html escapes
    # its cells; plotly escapes the JSON it embeds).
    parts = [f"<h1>vlmsae demo</h1><h2>summary</h2>{pd.Series(summary).to_frame('value').to_html(escape=True)}",
             f"<h2>per layer</h2>{table.to_html(float_format='{:.4f}'.format, escape=True)}"
             "<p>dead_fraction: the latents that fired on none of the dead_window_tokens evaluated tokens (fresh "
             "images). In the training curve a latent is dead when it fired on none of the last min(dead_tokens, "
             "tokens trained) training tokens.</p>"]
    if example is not None:
        parts.append(f"<h2>steering toward {html.escape(str(example['value']))} "
                     f"(layer {html.escape(str(example['layer']))})</h2>"
                     f"<p>before: {html.escape(str(example['before']))}<br>"
                     f"after: {html.escape(str(example['after']))}</p>")
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False))
    for L, found in (explained or {}).items():
        parts.append(_labels_html(L, found))
        parts.append(f"<p><a href='dashboard_L{L}.html'>every latent of layer {L}: the dashboard</a> (top images "
                     "and tokens, statistics, labels)</p>")
    for L, c in concepts.items():
        parts.append(f"<h2>layer {html.escape(str(L))}: concept AUROC</h2>{c.to_html(escape=True)}")
    parts.append(f"<h2>settings</h2><pre>{html.escape(str(asdict(cfg)))}</pre>")
    style = ("<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;display:block;overflow-x:auto;max-width:100%}"
             "td,th{padding:2px 6px;border-bottom:1px solid #ddd;text-align:right}"
             ".cards{display:flex;flex-wrap:wrap;gap:8px}.card{border:1px solid #ccc;border-radius:6px;padding:6px;"
             "width:330px;font-size:13px}.images img{width:48px;height:48px;image-rendering:pixelated;margin:2px}"
             "pre{white-space:pre-wrap;overflow-wrap:anywhere}.plotly-graph-div{max-width:100%}"
             "</style>")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>vlmsae demo</title>{style}</head><body>" \
           + "\n".join(parts) + "</body></html>"
    write_text_atomic(path, page)
