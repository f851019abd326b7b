"""Position selection: which positions of a forward an intervention or a scan touches (``where``).

``where`` is ``None`` (every non-pad position), a kind name or a list of them (``"image"``,
``"text"``, ``"special"``, ``"generated"``, ``"prompt"``: every non-pad position that was not
generated), a :class:`~vlmsae.adapters.Kind`, or a callable ``fwd -> (batch, seq) bool`` (padding is
never selected, whatever the callable returns).
"""

from __future__ import annotations

import torch
from torch import Tensor

from collections.abc import Callable, Iterable

from .adapters import Kind, ModelInfo, any_equal
from .errors import ConfigError
from .hooks import Forward
from .sites import stream_of

Where = None | str | Kind | Iterable[str | Kind] | Callable[[Forward], Tensor]
"""What ``where=`` accepts: ``None``, kind names or :class:`Kind` values (one or a list), or a callable
``fwd -> (batch, seq) bool``."""
WHERE_NAMES = ("all", "image", "text", "special", "generated", "prompt")
_KINDS_OF = {
    "all": (Kind.SPECIAL, Kind.IMAGE, Kind.TEXT, Kind.GENERATED),
    "image": (Kind.IMAGE,), "text": (Kind.TEXT,), "special": (Kind.SPECIAL,), "generated": (Kind.GENERATED,),
    "prompt": (Kind.SPECIAL, Kind.IMAGE, Kind.TEXT),
}


def where_kinds(where: Where, info: ModelInfo, site: str = "resid_post") -> tuple[Kind, ...] | None:
    """The kinds a ``where`` selects at ``site`` (``None`` for a callable): of those named, the ones the site's
    positions can hold (:meth:`ModelInfo.site_kinds`: no image in a ViT-GPT2 decoder, no text in a vision tower).

    Raises:
        ConfigError: an unknown kind name, ``where=[]``, or a choice that can select no token at this
            site (``"image"`` in a ViT-GPT2 decoder, ``"text"`` in a vision tower, only padding).
    """
    if callable(where) and not isinstance(where, (str, Kind)):
        return None
    names = ["all"] if where is None else [where] if isinstance(where, (str, Kind)) else list(where)
    if not names:
        raise ConfigError("where=[] selects no token; pass None for every non-pad position, or kind names")
    kinds = set()
    for name in names:
        if isinstance(name, Kind):
            kinds.add(name)
        elif name in _KINDS_OF:
            kinds.update(_KINDS_OF[name])
        else:
            raise ConfigError(f"where={name!r} is not a token kind; use one of {WHERE_NAMES} or a callable")
    if kinds == {Kind.PAD}:
        raise ConfigError(f"where={where!r} selects only padding; use 'text', 'image' or None")
    possible = info.site_kinds(site)
    kinds = {k for k in kinds if k in possible or k == Kind.PAD}
    if not kinds - {Kind.PAD}:
        if stream_of(site) == "decoder":
            raise ConfigError(
                f"where={where!r} selects no token in a {info.family} model: its decoder stream holds no image "
                "tokens (the image enters by cross-attention); use 'text' or None")
        names = sorted(k.name.lower() for k in possible)
        raise ConfigError(f"where={where!r} selects no position at site {site!r} of this {info.family} model, "
                          f"whose positions are {names}; use one of those or None")
    return tuple(sorted(kinds))


def where_mask(where: Where, kinds: tuple[Kind, ...] | None, fwd: Forward) -> Tensor:
    """``(batch, seq)`` bool: the positions of this forward that ``where`` selects; never padding.

    Raises:
        ConfigError: a callable ``where`` returned anything but a ``(batch, seq)`` bool tensor.
    """
    if kinds is not None:
        return any_equal(fwd.kinds, kinds)
    mask = where(fwd)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim != 2:
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ConfigError(f"where={where!r} returned {got}; a callable where must return a (batch, seq) bool tensor")
    if fwd.ids is not None or fwd.view is not None:
        return mask & (fwd.kinds != Kind.PAD).to(mask.device)
    if fwd.attention_mask is not None:  # inputs_embeds only: the attention mask still says where padding is
        return mask & (fwd.attention_mask[:, -mask.shape[1]:] != 0).to(mask.device)
    return mask
