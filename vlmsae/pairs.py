"""(image, text) pairs of activations for paired training (:func:`vlmsae.train_mgsae`), read with :func:`vlmsae.record`.

- a dual encoder (CLIP, SigLIP): the pooled ``image_embeds`` and ``text_embeds`` of each (image, caption) sample,
  recorded at ``hook_image_embeds`` and ``hook_text_embeds`` in one forward (:func:`embedding_pairs`);
- a VLM: per sample, the mean of its image-token and the mean of its text-token residuals at one decoder site
  (:func:`pooled_pairs`), the token kinds being the recording's own (:class:`~vlmsae.Kind`).

Both return ``(x_image, x_text)``, each ``(n, d)`` float32 on the CPU, row i of each the two sides of sample i.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from .adapters import Kind, Model
from .errors import ConfigError
from .record import record


@torch.no_grad()
def embedding_pairs(model: Model, data: Iterable[Mapping]) -> tuple[Tensor, Tensor]:
    """The pooled image and text embeddings of every sample of `data` (batches of ``model(**batch)`` inputs holding
    images and their captions) of a dual encoder: ``(x_image, x_text)``, each (n, d_embed).

    Raises SiteError if the model has no ``image_embeds`` / ``text_embeds`` site (not a dual encoder), ConfigError
    if `data` is empty.
    """
    images, texts = [], []
    for batch in data:
        with record(model, "hook_image_embeds") as image, record(model, "hook_text_embeds") as text:
            model(**batch)
        images.append(image[0].float().cpu())
        texts.append(text[0].float().cpu())
    if not images:
        raise ConfigError("data yielded no batch; pass batches of model inputs with images and captions")
    return torch.cat(images), torch.cat(texts)


@torch.no_grad()
def pooled_pairs(model: Model, layer: int | str, data: Iterable[Mapping], *, site: str = "resid_post"
                 ) -> tuple[Tensor, Tensor]:
    """Per sample of `data` (batches of ``model(**batch)`` inputs), the mean over its IMAGE positions and the mean
    over its TEXT positions of the residual at `layer` (an index at `site`, or a hook name such as
    ``"blocks.9.hook_resid_post"``): ``(x_image, x_text)``, each (n, d_model). Samples without image or without
    text positions are left out. Each forward stops after `layer`.

    Raises ConfigError if no sample has both (ViT-GPT2's decoder has no image positions: its image enters through
    cross-attention), LayerIndexError / SiteError as :func:`vlmsae.record`.
    """
    images, texts = [], []
    for batch in data:
        with record(model, layer, site=site, stop=True) as rec:
            model(**batch)
        resid, kinds = rec[layer].float(), rec.kinds(layer)  # (B, T, d), (B, T)
        image, text = (kinds == Kind.IMAGE), (kinds == Kind.TEXT)
        both = image.any(1) & text.any(1)
        images.append(_mean_over(resid, image)[both].cpu())
        texts.append(_mean_over(resid, text)[both].cpu())
    if not images or not sum(len(x) for x in images):
        raise ConfigError(f"no sample of data has both image and text positions at layer {layer!r}; pass samples "
                          "with images and text (a ViT-GPT2 decoder has no image positions)")
    return torch.cat(images), torch.cat(texts)


def _mean_over(resid: Tensor, where: Tensor) -> Tensor:
    """(B, T, d) -> (B, d): the mean of each sample's positions where `where` (B, T) is True (0 where none is)."""
    weights = where.to(resid.dtype)
    return (weights[..., None] * resid).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)
