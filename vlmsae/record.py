"""``vlmsae.record``: capture the residual stream of one or many layers in one forward."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from .adapters import Model, layers as adapter_info
from .deprecation import warn_renamed
from .errors import SiteError
from .hooks import Forward, attach, check_sites
from .sites import parse_site

Sink = Callable[[int, torch.Tensor, Forward], None]
"""``sink(layer, resid, fwd)``: receives each capture instead of the recording (e.g. a ring buffer's writer)."""


class Recording:
    """Residuals captured inside a :func:`record` block, with the token kind of each position (``rec.kinds(L)``).

    ``rec[L]`` is ``(batch, seq, d)``: the captures of every forward joined along the sequence.
    Under ``generate()`` the first forward holds the prompt and each later one the token fed back
    at that decode step, so ``rec[L]`` equals one uncached forward over ``sequences[:, :-1]`` (the
    last generated token is never fed back in). ``L`` may be the hook name too (``rec["vision.blocks.1.hook_resid_post"]``).
    At pooled embeddings (``image_embeds``, ``text_embeds``: layer 0) ``rec[0]`` is ``(batch, d)``.
    """

    def __init__(self, layers: list[int], site: str):
        self.layers = layers
        self.site = site
        self.forwards: list[Forward] = []
        self._steps: dict[int, list[tuple[Forward, torch.Tensor]]] = {layer: [] for layer in layers}
        self._pooled = site in ("image_embeds", "text_embeds")

    def _layer(self, key) -> int:
        """The layer a key names: a layer index, or a hook name of this recording's site."""
        if not isinstance(key, str):
            return key
        layer, site = parse_site(key, self.site)
        if site != self.site:
            raise KeyError(f"{key!r} is site {site!r}; this recording holds {self.site!r} "
                           f"(layers {self.layers})")
        return layer

    def _capture(self, layer: int, resid: torch.Tensor, fwd: Forward) -> None:
        if not self.forwards or self.forwards[-1] is not fwd:
            self.forwards.append(fwd)
        self._steps[layer].append((fwd, resid.detach()))

    def _check(self, layer) -> list[tuple[Forward, torch.Tensor]]:
        layer = self._layer(layer)
        if layer not in self._steps:
            raise KeyError(f"layer {layer} was not recorded; recorded layers: {self.layers}")
        steps = self._steps[layer]
        if not steps:
            raise ValueError(f"nothing was recorded at layer {layer}: run the model inside the record() block")
        fresh = [fwd.index for fwd, _ in steps[1:] if fwd.past == 0]
        if fresh:
            raise ValueError(
                f"record() saw {len(fresh) + 1} independent forwards (forwards {[steps[0][0].index, *fresh]} each "
                "start a new sequence), which cannot be joined into one; use rec.steps(layer), or one record() "
                "block per forward (under generate(use_cache=False) each step recomputes the whole sequence: "
                "rec.steps(layer)[-1] holds the last)")
        return steps

    def steps(self, layer: int) -> list[torch.Tensor]:
        """One ``(batch, seq_i, d)`` tensor per forward (per decode step under ``generate()``; ``(batch, 1, d)``
        at pooled embeddings)."""
        layer = self._layer(layer)
        if layer not in self._steps:
            raise KeyError(f"layer {layer} was not recorded; recorded layers: {self.layers}")
        return [resid for _, resid in self._steps[layer]]

    def __getitem__(self, layer: int) -> torch.Tensor:
        steps = self._check(layer)
        joined = steps[0][1] if len(steps) == 1 else torch.cat([r for _, r in steps], dim=1)
        return joined[:, 0] if self._pooled else joined

    def kinds(self, layer: int) -> torch.Tensor:
        """``(batch, seq)`` int8 :class:`~vlmsae.Kind` of each position of ``rec[layer]`` (``(batch,)`` at pooled
        embeddings).

        Raises:
            KeyError: ``layer`` was not recorded.
            ValueError: nothing was recorded, or the forwards cannot be joined (see ``steps``).
        """
        steps = self._check(layer)
        kinds = torch.cat([fwd.kinds for fwd, _ in steps], dim=1)
        return kinds[:, 0] if self._pooled else kinds

    def mask(self, layer: int) -> torch.Tensor:
        """Deprecated name of :meth:`kinds` (it returns kinds, not a mask)."""
        warn_renamed("Recording.mask(layer)", "Recording.kinds(layer)")
        return self.kinds(layer)

    def __repr__(self) -> str:
        shapes = {layer: tuple(self[layer].shape) for layer in self.layers if self._steps[layer]}
        return f"Recording(site={self.site!r}, {shapes})"


@contextmanager
def record(model: Model, layers: int | Iterable[int], *, site: str = "resid_post", stop: bool = False,
           sink: Sink | None = None, special_ids: Iterable[int] | None = None) -> Iterator[Recording]:
    """Capture the residual at ``site`` of each of ``layers`` on every forward inside the block.

    ``rec[L]`` is ``(batch, seq, d_model)``, equal to the model's ``output_hidden_states[L + 1]`` for
    ``resid_post`` (``[L]`` for ``resid_pre``); ``rec.kinds(L)`` is ``(batch, seq)`` int8 :class:`Kind`.
    Any site of the model is recorded alike (``site="vision.resid_post"`` or the hook names,
    ``"vision.blocks.1.hook_resid_post"``): a vision tower's ``rec[L]`` is ``(images, patches, d_vision)``, equal to
    its own ``output_hidden_states[L + 1]`` (Qwen-VL's flat ``(patches, d)`` split per image, in the processor's
    patch order: :mod:`vlmsae.streams`); pooled embeddings give ``(batch, d)``. One site per block: to keep a dual
    encoder's (image, caption) pairs, nest two blocks over one forward (``record(m, "hook_image_embeds")`` and
    ``record(m, "hook_text_embeds")``): row ``i`` of one is paired with row ``i`` of the other.
    ``stop=True`` ends each forward right after the deepest recorded layer (the model call returns
    ``None``): no compute is spent on layers nobody reads. ``sink`` receives every capture
    ``sink(layer, resid, fwd)`` instead of the recording keeping it (``resid`` ``(batch, seq, d)``, ``seq`` 1 at pooled
    embeddings). Captures are the model's own
    tensors, detached, in its dtype and on the layer's device. ``special_ids`` are token ids counted as
    SPECIAL besides the model's own (e.g. a chat template's control tokens). ``layers`` may be
    TransformerLens hook names (``"blocks.9.hook_resid_post"``): they give the site too, and ``rec[9]``
    holds the capture.

    Raises:
        LayerIndexError: a layer outside ``0..n - 1`` for the site's ``n`` layers.
        SiteError: ``site`` is not one of the model's sites (``vlmsae.layers(model).sites``), a layer is listed
            twice, or hook names of several sites.
        UnsupportedModelError: the model is not a supported family (see :func:`vlmsae.layers`).
    """
    layers = [layers] if isinstance(layers, (int, str)) else list(layers)
    parsed = [parse_site(layer, site) for layer in layers]  # a hook name gives its layer and its site
    sites = {s for _, s in parsed}
    if len(sites) > 1:
        raise SiteError(f"layers={layers!r} name sites {sorted(sites)}; record one site per record() block")
    layers, site = [layer for layer, _ in parsed], sites.pop() if sites else site
    rec = Recording(layers, site)

    def capture(layer):
        def fn(resid, fwd):
            if sink is None:
                rec._capture(layer, resid, fwd)
            else:
                sink(layer, resid.detach(), fwd)
        return fn

    check_sites(adapter_info(model), [(layer, site) for layer in layers])  # a repeated layer is an error
    fns = {(layer, site): capture(layer) for layer in layers}
    with attach(model, fns, stop=stop, special_ids=special_ids):
        yield rec
