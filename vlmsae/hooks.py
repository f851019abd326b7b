"""The one module that registers hooks on a model.

``attach(model, {(layer, site): fn})`` is a context manager: while it is open, ``fn(resid, fwd)``
sees the residual stream at each site on every forward (each decode step of ``generate()``
included, where ``resid`` holds only the new positions) and may return a replacement. On exit
(normal, an exception in the block, or an exception in a hook) every handle is removed in
``finally``, so the model is exactly as it was.

Sites, named as TransformerLens names them:

- ``resid_pre``: the input of decoder layer L;
- ``resid_post``: the output of decoder layer L.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from .adapters import Kind, ModelInfo, layers
from .errors import LayerIndexError, SiteError, UnsupportedModelError

SITES = ("resid_pre", "resid_post")


@dataclass(eq=False)
class Forward:
    """What one call of the model's forward is about, shared by every hook it fires."""

    info: ModelInfo
    index: int
    """0 for the first forward inside the context, then 1, 2, ..."""
    ids: torch.Tensor | None
    """``(batch, seq)`` ids of the positions this forward computes (only the new ones under a KV cache)."""
    attention_mask: torch.Tensor | None
    """``(batch, past + seq)`` or ``None``."""
    past: int
    """Positions already in the KV cache: 0 for a fresh sequence, > 0 for a decode step."""
    special_ids: frozenset[int] = field(default_factory=frozenset)

    @cached_property
    def kinds(self) -> torch.Tensor:
        """``(batch, seq)`` int8 :class:`~vlmsae.adapters.Kind` of each position; GENERATED on decode steps."""
        if self.ids is None:
            raise ValueError(
                f"forward {self.index} got no {self.info.ids_key!r}, so token kinds are unknown; call the model "
                f"with {self.info.ids_key}=... (not only inputs_embeds) to get a kind mask")
        kinds = self.info.kinds(self.ids, self.attention_mask, self.special_ids)
        if self.past > 0:
            kinds[kinds != Kind.PAD] = Kind.GENERATED
        return kinds

    @property
    def positions(self) -> torch.Tensor:
        """``(seq,)`` index of each new position in the whole sequence."""
        return torch.arange(self.past, self.past + self.ids.shape[1], device=self.ids.device)


HookFn = Callable[[torch.Tensor, Forward], "torch.Tensor | None"]


class StopForward(Exception):
    """Raised by the hook of the deepest site to end a forward early; caught at the model's own forward."""


def check_sites(info: ModelInfo, sites) -> list[tuple[int, str]]:
    """Validate ``(layer, site)`` pairs against the model; the error names the bad value and what is valid."""
    sites = list(sites)
    for layer, site in sites:
        if site not in SITES:
            raise SiteError(f"site={site!r} is not a hook site; valid sites: {SITES}")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < info.n_layers:
            raise LayerIndexError(
                f"layer={layer!r} is out of range for this {info.family} model with {info.n_layers} decoder "
                f"layers; valid layers: 0..{info.n_layers - 1}")
    seen = set()
    for key in sites:
        if key in seen:
            raise SiteError(f"site {key} is attached twice in one context; list each (layer, site) once")
        seen.add(key)
    return sites


def _replace(new: torch.Tensor, resid: torch.Tensor, key) -> torch.Tensor:
    if new.shape != resid.shape:
        raise SiteError(f"a hook at {key} returned shape {tuple(new.shape)}; it must keep {tuple(resid.shape)}")
    return new.to(device=resid.device, dtype=resid.dtype)


def execution_device(layer: nn.Module) -> torch.device | None:
    # accelerate's dispatch hook knows where the layer runs (its weights may be offloaded to "meta").
    hook = getattr(layer, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    param = next(layer.parameters(), None)
    return None if param is None or param.device.type == "meta" else param.device


@contextmanager
def attach(model, fns: Mapping[tuple[int, str], HookFn], *, stop: bool = False,
           special_ids=None) -> Iterator[ModelInfo]:
    """Run ``fns[(layer, site)](resid, fwd)`` at each site on every forward inside the block.

    ``stop=True`` ends each forward right after the deepest site (the model call then returns
    ``None``); use it when only activations are wanted. ``special_ids`` adds token ids counted
    as SPECIAL (e.g. a tokenizer's ``all_special_ids``).
    Validates everything before registering anything; removes every hook in ``finally``.
    """
    info = layers(model)
    sites = check_sites(info, fns)
    if not sites:
        raise SiteError("attach() got no sites; pass at least one {(layer, site): fn}")
    root = info.model
    if stop and hasattr(root.forward, "__wrapped_by_vlmsae__"):
        raise UnsupportedModelError("a stopping vlmsae context is already open on this model; nest none in another")
    order = {"resid_pre": 0, "resid_post": 1}
    deepest = max(sites, key=lambda s: (s[0], order[s[1]])) if stop else None
    extra = frozenset(int(i) for i in (special_ids or ()))
    state = {"forward": None, "count": 0}

    def on_forward(module, args, kwargs):
        if args:  # positional inputs: name them as the forward's signature does
            kwargs = inspect.signature(type(module).forward).bind_partial(module, *args, **kwargs).arguments
        ids = kwargs.get(info.ids_key)
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        state["forward"] = Forward(info, state["count"], ids, kwargs.get(info.mask_key), past, extra)
        state["count"] += 1

    def current() -> Forward:
        if state["forward"] is None:  # a submodule was called directly: no ids to classify tokens by
            state["forward"] = Forward(info, state["count"], None, None, 0, extra)
        return state["forward"]

    def post(key, fn):
        def hook(module, args, output):
            resid = output[0] if isinstance(output, tuple) else output
            new = fn(resid, current())
            if new is not None:
                new = _replace(new, resid, key)
                output = (new, *output[1:]) if isinstance(output, tuple) else new
            if key == deepest:
                raise StopForward
            return output if new is not None else None
        return hook

    def pre(key, fn, device):
        def hook(module, args, kwargs):
            resid = args[0] if args else kwargs["hidden_states"]
            if device is not None and resid.device != device:
                resid = resid.to(device)  # what the layer itself will compute on
            new = fn(resid, current())
            if key == deepest:
                raise StopForward
            if new is None:
                return None
            new = _replace(new, resid, key)
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
        return hook

    handles = []
    had_forward = "forward" in root.__dict__
    saved_forward = root.__dict__.get("forward")
    try:
        handles.append(root.register_forward_pre_hook(on_forward, with_kwargs=True))
        for key in sites:
            layer_index, site = key
            layer = info.layers[layer_index]
            if site == "resid_post":
                handles.append(layer.register_forward_hook(post(key, fns[key])))
            else:
                handles.append(layer.register_forward_pre_hook(pre(key, fns[key], execution_device(layer)),
                                                               with_kwargs=True))
        if stop:
            inner = root.forward

            def forward(*args, **kwargs):
                try:
                    return inner(*args, **kwargs)
                except StopForward:
                    return None

            forward.__wrapped_by_vlmsae__ = True
            root.forward = forward
        yield info
    finally:
        for handle in handles:
            handle.remove()
        if stop:
            if had_forward:
                root.forward = saved_forward
            else:
                root.__dict__.pop("forward", None)
