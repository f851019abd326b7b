"""The testbed's explainer and the ground truth its labels are checked against (issue 16).

:class:`ShapesQAExplainer`: the shipped Shapes QA model (LLaVA) answers the standard question set
(:data:`shapes.QUESTIONS`: colour, shape, position, size, count) about any image, offline, as
:func:`vlmsae.explain.explain` asks it. :func:`label_agreement`: for each concept value, whether the label of its
best latent (by concept AUROC) names that value; on the Shapes testbed this is what a right label is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from ..analysis import scan
from ..errors import ConfigError
from ..explain import explain, score_detection
from . import shapes
from .models import answer, load_qa


class ShapesQAExplainer:
    """The shipped Shapes QA model as a :class:`vlmsae.explain.Explainer`.

    ``ask(images, key)``: greedy answers to ``shapes.QUESTIONS[key]`` about ``(H, W, 3)`` uint8 images of
    ``shapes.IMAGE_SIZE`` pixels. Where an image holds several objects the answer lists one value per
    object in reading order (``"red and blue"``).
    """

    questions = shapes.QUESTIONS

    def __init__(self, model=None, tokenizer=None):
        self.model, self.tokenizer = (model, tokenizer) if model is not None else load_qa()

    def ask(self, images: Sequence[np.ndarray], question: str) -> list[str]:
        if question not in self.questions:
            raise ConfigError(f"question {question!r} is not one of the Shapes QA model's: {list(self.questions)}")
        size = (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)
        for image in images:
            if tuple(image.shape) != size:
                raise ConfigError(f"an image of shape {tuple(image.shape)}; the Shapes QA model reads {size} images")
        samples = [shapes.Sample(image=(np.asarray(im, dtype=np.float32) / 255).transpose(2, 0, 1), objects=(),
                                 masks=np.zeros((0, *size[:2]), dtype=bool)) for im in images]
        return answer(self.model, self.tokenizer, samples, question) if samples else []


def label_agreement(explanations: pd.DataFrame, concepts: pd.DataFrame,
                    concept_names: Sequence[str] = ("color", "shape")) -> pd.DataFrame:
    """Is each concept value's best latent labelled with that value?

    ``concepts``: :func:`vlmsae.testbed.concepts.concept_auroc` (index (concept, value); columns ``latent``,
    ``auroc``); ``explanations``: :func:`vlmsae.explain.explain` of (at least) those latents. A label is right
    when its question is the concept and its phrase the value (``"color: red"`` for red's best latent).
    Returns a DataFrame indexed by (concept, value): ``latent``, ``auroc``, ``label``, ``right``.

    Raises:
        ConfigError: a best latent was not explained.
    """
    rows = []
    for (concept, value), row in concepts.loc[list(concept_names)].iterrows():
        latent = int(row["latent"])
        if latent not in explanations.index:
            raise ConfigError(f"latent {latent} (best for {concept} {value!r}) was not explained; pass it to explain()")
        label = explanations.at[latent, "label"]
        rows.append({"concept": concept, "value": value, "latent": latent, "auroc": float(row["auroc"]),
                     "label": label, "right": label == f"{concept}: {value}"})
    return pd.DataFrame(rows).set_index(["concept", "value"])


def captioner_batches(samples: Sequence[shapes.Sample], tokenizer, batch: int = 128) -> list[dict[str, torch.Tensor]]:
    """The captioner's teacher-forced inputs for ``samples`` in batches (no labels), as :func:`vlmsae.scan` reads."""
    out = []
    for start in range(0, len(samples), batch):
        inputs = shapes.captioner_inputs(list(samples[start:start + batch]), tokenizer)
        inputs.pop("labels")
        out.append(inputs)
    return out


def explain_concepts(model, layer: int, sae, tokenizer, samples: Sequence[shapes.Sample], concepts: pd.DataFrame,
                     explainer: ShapesQAExplainer, *, concept_names: Sequence[str] = ("color", "shape"),
                     n_top: int = 8, n_negative: int = 8, n_score: int = 16, progress: bool = False) -> dict:
    """Explain the best latent of each concept value of the captioner's SAE and check the labels against the truth.

    ``concepts``: :func:`vlmsae.testbed.concepts.concept_auroc` of ``sae`` on ``samples`` (the captioner,
    teacher-forced); the latents are scanned on the same samples (``peaks=True``), explained (:func:`explain`)
    and scored by detection (:func:`score_detection`), once with their own labels and once, as a control, each
    with the label of the next latent in the list (every latent gets another's label). Returns
    ``{"explanations", "agreement" (:func:`label_agreement`), "scan", "images"}``; ``explanations`` holds
    :func:`explain`'s columns plus ``detection`` and ``detection_shuffled``.
    """
    latents = sorted({int(v) for v in concepts.loc[list(concept_names), "latent"]})
    found = scan(model, layer, sae, captioner_batches(samples, tokenizer), latents=latents, n_examples=n_top,
                 peaks=True)
    images = [s.image for s in samples]
    explanations = explain(found, images, explainer, n_top=n_top, n_negative=n_negative, tokenizer=tokenizer,
                           progress=progress)
    own = score_detection(explanations, found, images, explainer, n=n_score, progress=progress)
    labels = list(zip(explanations["question"], explanations["phrase"]))
    rotated = dict(zip(explanations.index, labels[1:] + labels[:1]))
    other = score_detection(explanations, found, images, explainer, n=n_score, labels=rotated, progress=progress)
    explanations = explanations.assign(detection=own["detection"], detection_shuffled=other["detection"])
    return {"explanations": explanations, "agreement": label_agreement(explanations, concepts, concept_names),
            "scan": found, "images": images}


def score_localisation(explanations: pd.DataFrame, found, samples: Sequence[shapes.Sample],
                       patch: int = shapes.PATCH) -> pd.Series:
    """Does a label's latent fire on the objects the label names? Per latent of ``explanations`` whose scan has
    heatmaps: the AUROC of its activation on the patches of its top examples at ranking the patches of objects
    with the label's value (any pixel covered) above the other patches. NaN for a latent without heatmaps, a label
    that is not about an object's attribute (count), or top examples without both kinds of patch.

    ``found``: the scan ``explanations`` were made from (``scan(..., peaks=True)`` of ``samples`` at an image-token
    or vision-tower site); ``patch``: the site's patch size in pixels.
    """
    from ..metrics import auroc

    out = {}
    for latent, row in explanations.iterrows():
        key, phrase, heats = row["question"], row["phrase"], found.top.heatmap(found.top.row(int(latent)))
        if heats is None or key not in ("color", "shape", "size", "position"):
            out[latent] = float("nan")
            continue
        pos, neg = [], []
        for j, example in enumerate(row["examples"]):
            sample = samples[example]
            named = [i for i, o in enumerate(sample.objects) if _attribute(o, key) == phrase]
            covered = sample.patch_coverage(patch)[named].sum(0) > 0 if named else np.zeros(heats.shape[1:], bool)
            heat = heats[j].float().numpy()
            pos.append(heat[covered])
            neg.append(heat[~covered])
        pos, neg = np.concatenate(pos), np.concatenate(neg)
        out[latent] = float(auroc(torch.from_numpy(pos)[:, None], torch.from_numpy(neg)[:, None])) \
            if len(pos) and len(neg) else float("nan")
    return pd.Series(out, name="localisation", dtype=float).rename_axis("latent")


def _attribute(obj: shapes.ShapeObject, key: str) -> str:
    return obj.position if key == "position" else obj.value(key)
