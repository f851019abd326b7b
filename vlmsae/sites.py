"""Site names: vlmsae's ``(layer, site)`` pairs and TransformerLens's hook names, one to one.

vlmsae names a site by a decoder layer index and ``"resid_pre"`` (the layer's input) or
``"resid_post"`` (its output). TransformerLens names the same tensors ``blocks.{L}.hook_resid_pre``
and ``blocks.{L}.hook_resid_post`` (SAELens stores these as an SAE's ``hook_name``), and
TransformerLens 4's ``TransformerBridge`` names them ``blocks.{L}.hook_in`` and ``blocks.{L}.hook_out``,
keeping the older names as aliases (TransformerLens docs, "TransformerBridge: hook aliases").
Every entry point that takes a layer and a site accepts either spelling; this module only parses
strings and imports no TransformerLens.
"""

from __future__ import annotations

import re

from .errors import SiteError

SITES = ("resid_pre", "resid_post")
"""vlmsae's site names: the input and the output of a decoder layer."""

LENS_HOOKS = {"hook_resid_pre": "resid_pre", "hook_in": "resid_pre",
              "hook_resid_post": "resid_post", "hook_out": "resid_post"}
"""A TransformerLens hook point of a block (``HookedTransformer`` name and ``TransformerBridge`` name) -> its site."""

_HOOK_NAME = re.compile(r"blocks\.(\d+)\.(\w+(?:\.\w+)*)")


def parse_site(layer, site: str = "resid_post") -> tuple[int, str]:
    """``(layer, site)`` in vlmsae's spelling, from vlmsae's or TransformerLens's.

    - ``layer`` an int: returned as is; ``site`` is ``"resid_pre"``, ``"resid_post"`` or a hook point
      name ``"hook_resid_post"`` / ``"hook_out"`` (and the ``_pre`` / ``hook_in`` pair).
    - ``layer`` a hook name, ``"blocks.9.hook_resid_post"`` (or ``"blocks.9.hook_out"``): gives the
      layer and the site; ``site`` must then be left at its default or name the same site.

    Any other value is returned unchanged, for :func:`vlmsae.hooks.check_sites` to reject with the
    valid range. Raises :class:`~vlmsae.errors.SiteError` for a hook name vlmsae has no site for
    (``blocks.9.hook_resid_mid``, ``blocks.9.attn.hook_z``) or that disagrees with ``site``.
    """
    site = LENS_HOOKS.get(site, site) if isinstance(site, str) else site
    if not isinstance(layer, str):
        return layer, site
    match = _HOOK_NAME.fullmatch(layer)
    if match is None:
        return layer, site
    point = match.group(2)
    if point not in LENS_HOOKS:
        raise SiteError(
            f"{layer!r} names a TransformerLens hook point vlmsae does not hook ({point!r}); vlmsae hooks a decoder "
            f"layer's input and output: blocks.{match.group(1)}.hook_resid_pre or blocks.{match.group(1)}.hook_resid_post")
    named = LENS_HOOKS[point]
    if site != "resid_post" and site != named:
        raise SiteError(f"the hook name {layer!r} is site {named!r} but site={site!r} was passed too; "
                        "pass the hook name alone, or a layer index with site=")
    return int(match.group(1)), named


def hook_name(layer: int, site: str = "resid_post") -> str:
    """The TransformerLens name of a site, as SAELens stores it: ``hook_name(9) == "blocks.9.hook_resid_post"``."""
    return f"blocks.{layer}.hook_{site}"
