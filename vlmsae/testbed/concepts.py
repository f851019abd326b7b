"""Do SAE latents mean something? Concept metrics on the Shapes testbed, where the truth is known.

- :func:`concept_auroc`: for every concept value (each colour, shape, size, position) the single
  latent that best detects it, and its AUROC, at the text positions that *predict* the concept
  word (so a latent must carry what the image shows, not echo a word already written).
- :func:`patch_auroc` (models with image tokens): the same, scored on image positions against
  the patches each object covers.
- :func:`steering_success`: amplify a concept value's latent at the positions that predict
  that concept while captioning images without it; count captions that switch to the value
  with the rest of the caption intact.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor

from ..adapters import Kind, layers as adapter_info
from ..deprecation import renamed_attributes, renamed_kwargs
from ..errors import ConfigError
from ..interventions import steer
from ..metrics import auroc
from ..record import record
from ..sae import SAE
from . import shapes
from .models import caption


@torch.no_grad()
def site_latents(model, layer: int, sae: SAE, tokenizer, samples: Sequence[shapes.Sample], *,
                 question: str | None = None, batch: int = 128) -> tuple[Tensor, pd.DataFrame]:
    """SAE latents at every concept word's predicting position, and a table of what each row is.

    ``question=None``: the captioner, teacher-forced on the true caption; a question: the QA model,
    teacher-forced on the true answer. Returns ``(n_sites, d_sae)`` latents and a DataFrame with
    ``sample``, ``object``, ``concept``, ``value`` per row.
    """
    rows, latents = [], []
    for start in range(0, len(samples), batch):
        chunk = list(samples[start:start + batch])
        inputs = (shapes.captioner_inputs(chunk, tokenizer) if question is None
                  else shapes.qa_inputs(chunk, tokenizer, question))
        inputs.pop("labels")
        with record(model, [layer], stop=True) as rec:
            model(**inputs)
        resid = rec[layer]
        index_b, index_t = [], []
        for i, sample in enumerate(chunk):
            for site in shapes.concept_sites(sample, question):
                index_b.append(i)
                index_t.append(site.predict)
                rows.append((start + i, site.obj, site.concept, site.value))
        x = resid[torch.tensor(index_b), torch.tensor(index_t)]
        latents.append(sae.encode(x.to(sae.W_dec.device)).float().cpu())
    return torch.cat(latents), pd.DataFrame(rows, columns=["sample", "object", "concept", "value"])


def best_latents(latents: Tensor, labels: pd.Series, groups: pd.Series | None = None) -> pd.DataFrame:
    """For each value in ``labels``: the latent with the highest AUROC at telling its rows from the
    other rows of the same group (e.g. red against the other colours), with that AUROC."""
    groups = groups if groups is not None else pd.Series(["all"] * len(labels), index=labels.index)
    out = []
    for group in groups.unique():
        in_group = torch.tensor((groups == group).to_numpy())
        for value in sorted(labels[in_group.numpy()].unique()):
            is_pos = torch.tensor((labels == value).to_numpy()) & in_group
            is_neg = in_group & ~is_pos
            if not is_pos.any() or not is_neg.any():
                continue
            scores = auroc(latents[is_pos], latents[is_neg])
            latent = int(scores.argmax())
            out.append({"concept": group, "value": value, "latent": latent, "auroc": float(scores[latent]),
                        "positives": int(is_pos.sum()), "negatives": int(is_neg.sum())})
    return pd.DataFrame(out).set_index(["concept", "value"])


def concept_auroc(model, layer: int, sae: SAE, tokenizer, samples: Sequence[shapes.Sample], *,
                  question: str | None = None) -> pd.DataFrame:
    """Best single latent and its AUROC for every concept value, at the positions predicting its word.

    Rows ``(concept, value)``; columns ``latent``, ``auroc``, ``positives``, ``negatives``. Each
    value is scored against the other values of the same concept.
    """
    latents, sites = site_latents(model, layer, sae, tokenizer, samples, question=question)
    return best_latents(latents, sites["value"], sites["concept"])


@torch.no_grad()
def patch_latents(model, layer: int, sae: SAE, tokenizer, samples: Sequence[shapes.Sample], *,
                  question: str = "color", batch: int = 128) -> tuple[Tensor, pd.DataFrame]:
    """SAE latents at every image position (one per patch), and what each patch shows.

    The table has ``sample``, ``patch`` and, per concept, the value of the object covering the
    patch (``"none"`` for background).
    """
    info = adapter_info(model)
    if not info.has_image_tokens:
        raise ConfigError(f"a {info.family} model has no image tokens in its decoder stream; patch AUROC needs "
                          "a model like LLaVA or Qwen-VL")
    rows, latents = [], []
    for start in range(0, len(samples), batch):
        chunk = list(samples[start:start + batch])
        inputs = shapes.qa_inputs(chunk, tokenizer, question, labels=False)
        with record(model, [layer], stop=True) as rec:
            model(**inputs)
        image = rec.kinds(layer) == Kind.IMAGE
        x = rec[layer][image]  # (batch * N_PATCHES, d), row-major over the patch grid
        latents.append(sae.encode(x.to(sae.W_dec.device)).float().cpu())
        for i, sample in enumerate(chunk):
            owner = sample.patch_labels().reshape(-1)
            for p, o in enumerate(owner):
                obj = sample.objects[o] if o >= 0 else None
                rows.append({"sample": start + i, "patch": p,
                             **{c: obj.value(c) if obj else "none" for c in shapes.CONCEPTS}})
    return torch.cat(latents), pd.DataFrame(rows)


def patch_auroc(model, layer: int, sae: SAE, tokenizer, samples: Sequence[shapes.Sample]) -> pd.DataFrame:
    """Best latent and AUROC per concept value at firing on the patches of objects with that value,
    against every other patch (other objects and background)."""
    latents, patches = patch_latents(model, layer, sae, tokenizer, samples)
    out = []
    for concept, values in shapes.CONCEPTS.items():
        for value in values:
            is_pos = torch.tensor((patches[concept] == value).to_numpy())
            if not is_pos.any():
                continue
            scores = auroc(latents[is_pos], latents[~is_pos])
            latent = int(scores.argmax())
            out.append({"concept": concept, "value": value, "latent": latent, "auroc": float(scores[latent]),
                        "positives": int(is_pos.sum()), "negatives": int((~is_pos).sum())})
    return pd.DataFrame(out).set_index(["concept", "value"])


def _with_value(caption: str, concept: str, value: str) -> str:
    """The caption with every word of ``concept`` replaced by ``value``."""
    words = set(shapes.CONCEPTS[concept])
    return " ".join(value if w in words else w for w in caption.split())


PREDICTED_AFTER = {"color": shapes.SIZES, "shape": shapes.COLORS}
"""In the caption grammar ``a {size} {color} {shape} ...``: the words whose position predicts each concept."""


@torch.no_grad()
@renamed_kwargs(features="latents")
def steering_success(model, tokenizer, layer: int, sae: SAE, samples: Sequence[shapes.Sample], *, concept: str,
                     value: str, latents: Sequence[int], strength: float) -> tuple[float, pd.DataFrame]:
    """Fraction of captions of images *without* ``value`` that switch to it, the rest of the caption intact.

    The decoder directions of ``latents`` are added with ``strength`` (in latent units) only at
    the positions that predict ``concept`` (the word before it in the grammar), at every decode step.
    Returns the success rate and a table of clean and steered captions.
    """
    if concept not in PREDICTED_AFTER:
        raise ConfigError(f"concept={concept!r} cannot be steered here; choose one of {sorted(PREDICTED_AFTER)}")
    chosen = [s for s in samples if not s.has(value)]
    if not chosen:
        raise ConfigError(f"every sample shows {value!r}; steering needs images without it")
    before = caption(model, tokenizer, chosen)
    trigger = torch.tensor(tokenizer.convert_tokens_to_ids(list(PREDICTED_AFTER[concept])))

    def where(fwd):
        return torch.isin(fwd.ids, trigger.to(fwd.ids.device))

    with steer(model, layer, sae, {int(f): strength for f in latents}, where=where):
        after = caption(model, tokenizer, chosen)
    wanted = [_with_value(b, concept, value) for b in before]
    table = pd.DataFrame({"before": before, "after": after, "wanted": wanted})
    table["success"] = table["after"] == table["wanted"]
    return float(table["success"].mean()), table


__getattr__ = renamed_attributes(__name__, {"best_features": "best_latents"}, globals())
