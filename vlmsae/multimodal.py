"""Metrics over the sparse codes of image and text embeddings: the modality census and zero-shot classification.

Both come from Kaushik, Barch and Fanelli 2026 (arXiv 2601.20028, the MGSAE paper), who compare a TopK SAE and
an MGSAE on CLIP ViT-B/16 embeddings by (a) how many latents fire on images only, on texts only, on both or on
neither over a dataset, and (b) zero-shot classification from the codes alone: an image's code against the
codes of class prompts. The caller encodes (one SAE for both modalities: ``sae.encode(x)``; an MGSAE:
``sae.encode(x, "image")`` and ``sae.encode(x, "text")``); these functions only read codes, so the raw
embeddings themselves (an identity encoder) give CLIP's own zero-shot.
"""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError, NonFiniteError

MODALITY_LABELS = ("image_only", "text_only", "both", "dead")
"""The census's classes of a latent, in the order of its counts."""
SIMILARITIES = ("cosine", "dot")
REDUCTIONS = ("max", "mean")


class Census(NamedTuple):
    """Where each latent fires over a dataset of ``n_image`` image codes and ``n_text`` text codes.

    A latent fires on a row when its code there is above ``threshold`` (0: any positive activation). ``dead``
    counts latents firing on no row of either modality, over these rows only (not the training run's window).
    ``latents``: one row per latent (index = latent id), columns ``image_fraction`` and ``text_fraction`` (the
    share of that modality's rows it fires on) and ``label`` (one of :data:`MODALITY_LABELS`, categorical).
    """

    image_only: int
    text_only: int
    both: int
    dead: int
    n_image: int
    n_text: int
    threshold: float
    latents: pd.DataFrame

    def counts(self) -> dict[str, int]:
        """``{"image_only": ..., "text_only": ..., "both": ..., "dead": ...}``."""
        return {name: getattr(self, name) for name in MODALITY_LABELS}


@torch.no_grad()
def modality_census(z_image: Tensor, z_text: Tensor, *, threshold: float = 0.0) -> Census:
    """The modality census (Kaushik et al. 2026) of codes z_image (n_image, d_sae) and z_text (n_text, d_sae)
    (the rows need not be paired; n_image and n_text may differ): per latent, does it fire (code > `threshold`)
    on at least one image row, at least one text row, both, or neither (dead over these rows).

    Raises ConfigError for codes that are not 2-d with the same d_sae and at least one row each, or a negative or
    non-finite threshold; NonFiniteError for NaN or Inf in the codes.
    """
    _check_codes("z_image", z_image)
    _check_codes("z_text", z_text)
    if z_image.shape[1] != z_text.shape[1]:
        raise ConfigError(f"z_image has d_sae={z_image.shape[1]} and z_text d_sae={z_text.shape[1]}; encode both "
                          "modalities with the same SAE")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < float("inf"):
        raise ConfigError(f"threshold={threshold!r} must be a finite number >= 0 (0: a latent fires when its code > 0)")
    image_fraction = (z_image > threshold).float().mean(0)  # (d_sae,)
    text_fraction = (z_text > threshold).float().mean(0)
    on_image, on_text = image_fraction > 0, text_fraction > 0
    kind = torch.full_like(on_image, MODALITY_LABELS.index("dead"), dtype=torch.long)
    kind[on_image & ~on_text] = MODALITY_LABELS.index("image_only")
    kind[~on_image & on_text] = MODALITY_LABELS.index("text_only")
    kind[on_image & on_text] = MODALITY_LABELS.index("both")
    counts = torch.bincount(kind, minlength=len(MODALITY_LABELS)).tolist()
    latents = pd.DataFrame({
        "image_fraction": image_fraction.cpu().numpy(),
        "text_fraction": text_fraction.cpu().numpy(),
        "label": pd.Categorical.from_codes(kind.cpu().numpy(), categories=list(MODALITY_LABELS)),
    })
    latents.index.name = "latent"
    return Census(*counts, n_image=len(z_image), n_text=len(z_text), threshold=float(threshold), latents=latents)


class ZeroShot(NamedTuple):
    """Zero-shot classification of n images among n_classes classes: ``predictions`` (n,) long, the class of
    highest score; ``scores`` (n, n_classes) float32, each class's similarity reduced over its prompts."""

    predictions: Tensor
    scores: Tensor

    def accuracy(self, labels: Tensor) -> float:
        """The fraction of images whose prediction is `labels` (n,) (class indices)."""
        labels = torch.as_tensor(labels, device=self.predictions.device)
        if labels.shape != self.predictions.shape:
            raise ConfigError(f"labels has shape {tuple(labels.shape)}; one class index per image is "
                              f"{tuple(self.predictions.shape)}")
        return (self.predictions == labels).float().mean().item()


@torch.no_grad()
def zero_shot_from_codes(image_codes: Tensor, prompt_codes: Tensor, *, similarity: str = "cosine",
                         reduce: str = "max") -> ZeroShot:
    """Classify each image by the similarity of its code to the codes of class prompts (Kaushik et al. 2026).

    image_codes: (n, d_sae), the codes of the images. prompt_codes: (n_classes, d_sae), one prompt per class, or
    (n_classes, n_prompts, d_sae), several per class, a class scoring the max (``reduce="max"``) or mean
    (``"mean"``) of its prompts' similarities: with prompts ``a {color} {shape}`` laid out (colors, shapes,
    d_sae), colour is scored by the max over shapes, as :func:`vlmsae.testbed.clip.zero_shot` scores it, and
    ``prompt_codes.transpose(0, 1)`` scores shape by the max over colours. `similarity`: ``"cosine"`` (a code of
    all zeros has cosine 0 with everything) or ``"dot"``. Ties go to the lowest class index.

    Raises ConfigError for bad shapes or options, NonFiniteError for NaN or Inf in the codes.
    """
    if similarity not in SIMILARITIES:
        raise ConfigError(f"similarity={similarity!r} is unknown; use one of {', '.join(SIMILARITIES)}")
    if reduce not in REDUCTIONS:
        raise ConfigError(f"reduce={reduce!r} is unknown; use one of {', '.join(REDUCTIONS)}")
    _check_codes("image_codes", image_codes)
    if prompt_codes.ndim not in (2, 3) or 0 in prompt_codes.shape:
        raise ConfigError(f"prompt_codes has shape {tuple(prompt_codes.shape)}; pass (n_classes, d_sae) or "
                          "(n_classes, n_prompts, d_sae), none of them 0")
    _check_finite("prompt_codes", prompt_codes)
    if prompt_codes.shape[-1] != image_codes.shape[1]:
        raise ConfigError(f"prompt_codes has d_sae={prompt_codes.shape[-1]} and image_codes d_sae="
                          f"{image_codes.shape[1]}; encode both with the same SAE")
    prompts = prompt_codes if prompt_codes.ndim == 3 else prompt_codes[:, None]
    image, text = image_codes.float(), prompts.float().to(image_codes.device)
    if similarity == "cosine":
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    sim = torch.einsum("nd,cpd->ncp", image, text)  # (n, n_classes, n_prompts)
    scores = sim.amax(2) if reduce == "max" else sim.mean(2)
    return ZeroShot(scores.argmax(1), scores)


def _check_codes(name: str, codes: Tensor) -> None:
    if codes.ndim != 2 or 0 in codes.shape:
        raise ConfigError(f"{name} has shape {tuple(codes.shape)}; pass codes (n_rows, d_sae) with n_rows >= 1")
    _check_finite(name, codes)


def _check_finite(name: str, codes: Tensor) -> None:
    bad = ~torch.isfinite(codes).reshape(len(codes), -1).all(1)
    if bad.any():
        rows = bad.nonzero().view(-1)
        raise NonFiniteError(f"{name} holds NaN or Inf in {len(rows)} rows ({rows[:8].tolist()}); "
                             "check the embeddings and the SAE's weights")
