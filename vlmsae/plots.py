"""plotly figures of SAE analysis: each function takes what vlmsae measured and returns a ``go.Figure``.

Use in a notebook with ``fig.show()``; :mod:`vlmsae.dashboard` puts some of them in an HTML file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .adapters import Kind
from .analysis import ImageQuestionGrid, Scan, TopExamples
from .deprecation import renamed_kwargs
from .errors import ConfigError
from .metrics import token_count

HEAT = "Inferno"  # perceptually uniform and still readable over a photo at half opacity


def to_rgb(image) -> np.ndarray:
    """``(H, W, 3)`` uint8 from a PIL image, or an array / tensor ``(3, H, W)`` or ``(H, W, 3)`` in [0, 1] or 0..255."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"))
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
        raise ConfigError(f"an image of shape {array.shape}; give (3, H, W) or (H, W, 3)")
    if array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = np.clip(np.asarray(array, dtype=np.float32) * (255 if array.max() <= 1.0 else 1), 0, 255)
        array = array.round().astype(np.uint8)
    return array


def density_histogram(table: pd.DataFrame, bins: int = 40) -> go.Figure:
    """Histogram of log10 firing density over the latents that fired (``table`` from ``latent_table``)."""
    alive = table.loc[~table["dead"], "log10_density"]
    fig = go.Figure(go.Histogram(x=alive, nbinsx=bins, name="latents"))
    fig.update_layout(title=f"Feature density ({int(table['dead'].sum())} dead of {len(table)}, "
                            f"{int(table['dense'].sum())} dense)",
                      xaxis_title="log10 firing density", yaxis_title="latents", bargap=0.05)
    return fig


def l0_by_kind(scan: Scan) -> go.Figure:
    """Distribution of L0 (latents active at a position) for each token kind."""
    counts = scan.l0_counts.cpu()
    fig = go.Figure()
    for kind in Kind:
        row = counts[int(kind)]
        n = int(row.sum())
        if n == 0:
            continue
        present = row.nonzero().flatten()
        l0 = torch.arange(int(present.min()), int(present.max()) + 1)
        mean = float((row * torch.arange(len(row))).sum()) / n
        fig.add_trace(go.Bar(x=l0.numpy(), y=(row[l0].double() / n).numpy(),
                             name=f"{kind.name.lower()} (mean {mean:.1f}, {n} tokens)"))
    fig.update_layout(title="L0 per token kind", xaxis_title="L0 (latents active at a position)",
                      yaxis_title="share of positions", barmode="group")
    return fig


def training_curves(history) -> go.Figure:
    """Loss, FVU, L0 and dead fraction against step, from ``SAETrainer.history`` (or a DataFrame of it); the dead
    panel's title states the window (``TrainMetrics.dead_window``, the largest of the run)."""
    if not isinstance(history, pd.DataFrame):
        history = pd.DataFrame([dataclasses.asdict(m) if dataclasses.is_dataclass(m) else dict(m) for m in history])
    if history.empty:
        raise ConfigError("training history is empty; the trainer records a row every sync_every steps")
    dead = "dead fraction"
    if "dead_window" in history and history["dead_window"].notna().any():  # the window, up to dead_tokens
        dead += f" (silent for {token_count(int(history['dead_window'].max()))} tokens)"
    panels = [("loss", "loss"), ("fvu", "FVU"), ("l0", "L0"), ("dead_fraction", "dead fraction")]
    fig = make_subplots(rows=2, cols=2, subplot_titles=[title for _, title in panels[:3]] + [dead])
    for i, (column, title) in enumerate(panels):
        row, col = i // 2 + 1, i % 2 + 1
        fig.add_trace(go.Scatter(x=history["step"], y=history[column], mode="lines+markers", name=title),
                      row=row, col=col)
        fig.update_xaxes(title_text="step", row=row, col=col)
        fig.update_yaxes(title_text=title, type="log" if column == "loss" else None, row=row, col=col)
    fig.update_layout(title="SAE training", showlegend=False)
    return fig


def context_text(top: TopExamples, row: int, j: int, tokenizer=None, mark: str = "[{}]") -> str:
    """The tokens around the peak of example ``j`` of ``top`` row ``row``, the peak token marked."""
    ids = top.tokens[row, j].tolist()
    middle = len(ids) // 2
    words = []
    for i, t in enumerate(ids):
        if t < 0:
            continue
        word = tokenizer.convert_ids_to_tokens(t) if tokenizer is not None else str(t)
        words.append(mark.format(word) if i == middle else str(word))
    return " ".join(words)


@renamed_kwargs(feature="latent")
def top_images(top: TopExamples, latent: int, images: Sequence, *, tokenizer=None, n: int = 6) -> go.Figure:
    """The images where ``latent`` peaks, best first, with its patch heatmap over each (LLaVA / Qwen).

    ``images[i]`` is example ``i`` of the scanned data (PIL, array or tensor); titles show the
    peak activation and the tokens around the peak.
    """
    row = top.row(latent)
    shown = [j for j in range(top.values.shape[1]) if top.example[row, j] >= 0 and top.values[row, j] > 0][:n]
    if not shown:
        raise ConfigError(f"latent {latent} never fired on the scanned data; pick a live latent "
                          "(latent_table(...).query('not dead'))")
    titles = [f"#{int(top.example[row, j])} · {float(top.values[row, j]):.2f}<br>"
              f"<sub>{context_text(top, row, j, tokenizer)}</sub>" for j in shown]
    fig = make_subplots(rows=1, cols=len(shown), subplot_titles=titles, horizontal_spacing=0.02)
    heats = top.heatmap(row)
    zmax = float(heats.max()) if heats is not None else 0.0
    for col, j in enumerate(shown, start=1):
        rgb = to_rgb(images[int(top.example[row, j])])
        fig.add_trace(go.Image(z=rgb, name=f"example {int(top.example[row, j])}"), row=1, col=col)
        if heats is not None:
            heat = heats[j].cpu().numpy()
            dy, dx = rgb.shape[0] / heat.shape[0], rgb.shape[1] / heat.shape[1]
            fig.add_trace(go.Heatmap(z=heat, x0=dx / 2 - 0.5, dx=dx, y0=dy / 2 - 0.5, dy=dy, zmin=0,
                                     zmax=max(zmax, 1e-9), colorscale=HEAT, opacity=0.5, showscale=col == 1,
                                     name="activation", colorbar=dict(title="activation")), row=1, col=col)
        fig.update_xaxes(title_text="x (pixels)", showticklabels=False, row=1, col=col)
        fig.update_yaxes(title_text="y (pixels)" if col == 1 else None, showticklabels=False, row=1, col=col)
    fig.update_layout(title=f"Latent {latent}: top examples", height=320)
    return fig


@renamed_kwargs(feature="latent")
def image_question_grid(grid: ImageQuestionGrid, latent: int, *, image_labels: Sequence[str] | None = None,
                        ) -> go.Figure:
    """A latent's activation for every image (rows) and question (columns)."""
    if latent not in grid.latents:
        raise ConfigError(f"latent {latent} is not on the grid; it holds {grid.latents}")
    values = grid.values[grid.latents.index(latent)].numpy()
    labels = list(image_labels) if image_labels is not None else [f"image {i}" for i in range(values.shape[0])]
    share = grid.dependence().loc[latent]
    fig = go.Figure(go.Heatmap(z=values, x=grid.questions, y=labels, colorscale="Viridis",
                               colorbar=dict(title="activation"), name=f"latent {latent}"))
    fig.update_layout(title=f"Latent {latent}: image share {share['image_share']:.2f}, "
                            f"question share {share['question_share']:.2f}",
                      xaxis_title="question", yaxis_title="image", yaxis_autorange="reversed")
    return fig


def evaluation(table: pd.DataFrame) -> go.Figure:
    """Cross-entropy clean / spliced / ablated per choice of spliced positions (``vlmsae.evaluate``'s table)."""
    bars = [(c, name) for c, name in (("ce_clean", "clean"), ("ce_spliced", "spliced"), ("ce_mean", "mean-ablated"),
                                      ("ce_zero", "zero-ablated")) if c in table]
    fig = go.Figure([go.Bar(x=list(table.index), y=table[c], name=name) for c, name in bars])
    if "loss_recovered" in table:
        recovered = ", ".join(f"{w}: {v:.3f}" for w, v in table["loss_recovered"].items())
        title = f"Splice cost (loss recovered {recovered})"
    else:
        title = "Splice cost"
    fig.update_layout(title=title, xaxis_title="spliced positions", yaxis_title="cross-entropy (nats)",
                      barmode="group")
    return fig


def steering(before: Sequence[str], after: Sequence[str], words: Sequence[str]) -> go.Figure:
    """Outputs before and after steering: a table of each pair and how many outputs hold each of ``words``."""
    if len(before) != len(after):
        raise ConfigError(f"{len(before)} outputs before steering but {len(after)} after; pair them up")
    fig = make_subplots(rows=2, cols=1, specs=[[{"type": "table"}], [{"type": "xy"}]], row_heights=[0.6, 0.4],
                        vertical_spacing=0.08)
    fig.add_trace(go.Table(header=dict(values=["before", "after"]), cells=dict(values=[list(before), list(after)])),
                  row=1, col=1)
    for name, texts in (("before", before), ("after", after)):
        counts = [sum(w in text.split() for text in texts) for w in words]
        fig.add_trace(go.Bar(x=list(words), y=counts, name=name), row=2, col=1)
    fig.update_xaxes(title_text="word", row=2, col=1)
    fig.update_yaxes(title_text="outputs containing it", row=2, col=1)
    fig.update_layout(title="Steering: before and after", barmode="group", height=600)
    return fig


@renamed_kwargs(features="latents")
def auroc_matrix(aurocs: pd.DataFrame, latents: Sequence[int] | None = None) -> go.Figure:
    """AUROC of latents (columns) for concept values (rows); by default each value's best latent."""
    if latents is None:
        best = aurocs.to_numpy().argmax(1)
        latents = list(dict.fromkeys(int(aurocs.columns[i]) for i in best))
    names = ["=".join(map(str, key)) if isinstance(key, tuple) else str(key) for key in aurocs.index]
    z = aurocs.loc[:, list(latents)].to_numpy()
    fig = go.Figure(go.Heatmap(z=z, x=[str(i) for i in latents], y=names, zmin=0.5, zmax=1.0, colorscale="Viridis",
                               text=np.round(z, 2), texttemplate="%{text}", colorbar=dict(title="AUROC"),
                               name="AUROC"))
    fig.update_layout(title="Concept AUROC of the best latents", xaxis_title="latent", yaxis_title="concept",
                      xaxis_type="category", yaxis_autorange="reversed")
    return fig


def probe_accuracy(table: pd.DataFrame) -> go.Figure:
    """Held-out probe accuracy per concept for each input (``vlmsae.probes.compare_probes``'s table), with chance."""
    inputs = [c for c in table.columns if c != "chance"]
    fig = go.Figure([go.Bar(x=list(table.index), y=table[c], name=c) for c in inputs])
    fig.add_trace(go.Scatter(x=list(table.index), y=table["chance"], mode="markers", name="chance",
                             marker=dict(symbol="line-ew-open", size=30, line=dict(width=3))))
    fig.update_layout(title="Linear probes", xaxis_title="concept", yaxis_title="held-out accuracy",
                      yaxis_range=[0, 1.02], barmode="group")
    return fig
