"""Positions of the streams besides the decoder's: each site's tensor seen as ``(batch, seq, d)`` with token kinds.

Every hook function gets ``(batch, seq, d)`` and a :class:`~vlmsae.hooks.Forward` whose ``kinds`` are
``(batch, seq)``, whatever the site (:func:`vlmsae.attach`). The decoder's stream is that already; a tower's
tensors need a view, built once per call of the tower from its inputs (:class:`TowerCall`):

- a CLIP-ViT / SigLIP / ViT tower: ``(images, patches, d)`` as is, the class token (position 0, where the tower has
  one) SPECIAL, every patch IMAGE, row-major over the patch grid; Idefics3's padding patches PAD;
- Qwen-VL's ViT: ``(total patches, d)``, every image of the call concatenated (``grid_thw`` gives each its
  ``t * h * w`` patches), in the image processor's order (``merge x merge`` blocks of patches, the blocks
  row-major). Shown as ``(images, most patches, d)`` in that order, shorter images padded (PAD). In Qwen2.5-VL the
  blocks run on the patches in window order (transformers' ``get_vision_window_index``, undone only after the
  merger): the view puts each row back on its patch, so that position ``s`` of image ``b`` is the same patch at
  every block, at the merger (``vision.proj_out``, one position per ``merge x merge`` block) and in
  ``pixel_values``;
- a projector's output: ``(images, tokens, d)``, every position IMAGE (Qwen's merger: flat, per image as above);
- pooled embeddings ``(batch, d)`` (``image_embeds``, ``text_embeds``): shown as ``(batch, 1, d)``, one position
  of kind IMAGE or TEXT.

A text tower's positions are its token ids, whose kinds :class:`~vlmsae.hooks.Forward` reads as the decoder's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .adapters import Kind, Tower


@dataclass
class View:
    """How one site's tensor maps onto ``(batch, seq)`` positions, and back."""

    kinds: Tensor
    """``(batch, seq)`` int8 :class:`Kind` of each position."""
    rows: Tensor | None = None
    """``(batch, seq)`` row of each position in a flat ``(rows, d)`` tensor, -1 at padding; ``None``: the tensor
    is ``(batch, seq, d)`` already (or ``(batch, d)`` when ``pooled``)."""
    pooled: bool = False
    """The tensor is ``(batch, d)``: one position per sample."""

    def show(self, x: Tensor) -> Tensor:
        """A copy of ``x`` as ``(batch, seq, d)`` (zeros at padding): a copy, since later hooks may write ``x``."""
        if self.pooled:
            return x[:, None].clone()
        if self.rows is None:
            return x.clone()
        shown = x[self.rows.clamp_min(0)]
        return shown.masked_fill((self.rows < 0)[..., None].to(shown.device), 0)

    def put(self, x: Tensor, new: Tensor) -> Tensor:
        """``x`` (the site's own tensor) with the values of ``new`` ``(batch, seq, d)`` written back, in place."""
        if self.pooled:
            new = new[:, 0]
        elif self.rows is not None:
            real = self.rows >= 0
            x[self.rows[real]] = new[real].to(x.dtype)
            return x
        return x.copy_(new)


def _rows(lengths: list[int], order: Tensor | None, device) -> Tensor:
    """``(images, max length)`` flat row of each image's positions: images one after another, then reordered by
    ``order`` (``order[j]``: the processor-order position held by row ``j``), -1 past an image's length."""
    starts = torch.tensor([0, *lengths], device=device).cumsum(0)[:-1]
    width = max(lengths, default=0)
    at = torch.arange(width, device=device)
    rows = starts[:, None] + at  # processor order
    rows = torch.where(at < torch.tensor(lengths, device=device)[:, None], rows, -1)
    if order is not None:
        where = torch.argsort(order.to(device))  # where[i]: the row holding processor position i
        rows = torch.where(rows >= 0, where[rows.clamp_min(0)], -1)
    return rows


def _kinds(shape, *, cls: bool = False, pad: Tensor | None = None, kind: Kind = Kind.IMAGE, device=None) -> Tensor:
    kinds = torch.full(shape, kind, dtype=torch.int8, device=device)
    if cls:
        kinds[:, 0] = Kind.SPECIAL
    if pad is not None:
        kinds[pad.to(device)] = Kind.PAD
    return kinds


class TowerCall:
    """One call of a vision tower's forward: what the views of its sites need, read from its arguments.

    ``grid_thw`` (Qwen-VL: the forward's ``grid_thw``), the window order (Qwen2.5-VL) and the real-patch mask
    (Idefics3's ``patch_attention_mask``) are read once per call; each site's :class:`View` is built from them and
    the tensor's shape.
    """

    def __init__(self, tower: Tower, module: nn.Module, args: tuple, kwargs: dict):
        self.tower, self.module = tower, module
        if args:  # positional inputs: name them as the forward's signature does, its **kwargs flattened
            named = inspect.signature(type(module).forward).bind_partial(module, *args, **kwargs).arguments
            kwargs = {**named.pop("kwargs", {}), **named}
        self.grid_thw = kwargs.get("grid_thw") if tower.flat else None
        self.patch_mask = kwargs.get(tower.patch_mask) if tower.patch_mask else None
        self.window = _window_index(module, self.grid_thw, kwargs) if tower.window and self.grid_thw is not None \
            else None
        self.views: dict[str, View] = {}

    def view(self, group: str, x: Tensor) -> View:
        """The :class:`View` of a ``"resid"`` (a layer's input or output) or ``"proj"`` (the merger's or projector's
        output) tensor ``x`` of this call."""
        found = self.views.get(group)
        if found is None or _stale(found, x):
            found = self.views[group] = self._build(group, x)
        return found

    def _build(self, group: str, x: Tensor) -> View:
        if self.tower.flat:
            merge = 1 if group == "resid" else self.module.spatial_merge_size ** 2
            lengths = [int(t * h * w) // merge for t, h, w in self.grid_thw.tolist()]
            order = self.window
            if order is not None and group == "resid":  # the window order moves whole merge x merge blocks
                unit = self.module.spatial_merge_size ** 2
                order = (order[:, None] * unit + torch.arange(unit, device=order.device)).reshape(-1)
            rows = _rows(lengths, order, x.device)
            return View(_kinds(rows.shape, pad=rows < 0, device=x.device), rows)
        pad = None
        if group == "resid" and self.patch_mask is not None:
            real = self.patch_mask.reshape(self.patch_mask.shape[0], -1)
            if real.shape[1] == x.shape[1] - int(self.tower.cls_token):
                pad = ~real.bool()
                if self.tower.cls_token:
                    pad = torch.cat([torch.zeros_like(pad[:, :1]), pad], 1)
        return View(_kinds(x.shape[:2], cls=self.tower.cls_token and group == "resid", pad=pad, device=x.device))


def _stale(view: View, x: Tensor) -> bool:
    """A view built for another tensor shape (a tower called on the same inputs with other layers' shapes)."""
    if view.rows is not None:
        return False
    return tuple(view.kinds.shape) != tuple(x.shape[:2])


def pooled_view(x: Tensor, kind: Kind) -> View:
    """The :class:`View` of pooled embeddings ``(batch, d)``: one position per sample, of ``kind``."""
    return View(_kinds((x.shape[0], 1), kind=kind, device=x.device), pooled=True)


def _window_index(module: nn.Module, grid_thw: Tensor, kwargs: dict) -> Tensor:
    """Qwen2.5-VL's window order of the merged blocks, as the tower computes it (``window_index[j]``: the block at
    window position ``j``): the caller's precomputed ``window_index`` if it passed one, else transformers' own
    ``get_vision_window_index`` (5.x), else the tower's ``get_window_index`` method (4.x)."""
    given = kwargs.get("window_index")
    if given is not None:
        return given
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:
        return module.get_window_index(grid_thw)[0]
    return get_vision_window_index(grid_thw, spatial_merge_size=module.spatial_merge_size,
                                   window_size=module.window_size, patch_size=module.patch_size)[0]
