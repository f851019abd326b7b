"""Site names: vlmsae's ``(layer, site)`` pairs and TransformerLens-style hook names, one to one.

vlmsae names a site by a layer index and a site name. One scheme covers every place it hooks:

=============================  =====================================  ====================================
site                           hook name                              tensor
=============================  =====================================  ====================================
``resid_pre`` / ``resid_post``   ``blocks.{L}.hook_resid_pre`` / ``_post``     input / output of decoder layer L
``mlp_in`` / ``mlp_out``         ``blocks.{L}.hook_mlp_in`` / ``hook_mlp_out``  the MLP's input (after its pre-norm) /
                                                                      what it adds to the residual (after its
                                                                      post-norm, where it has one: Gemma 2 / 3)
``vision.resid_pre`` / ``_post``  ``vision.blocks.{L}.hook_resid_pre`` / ``_post``  input / output of vision-tower layer L
``text.resid_pre`` / ``_post``    ``text.blocks.{L}.hook_resid_pre`` / ``_post``    the same in a dual encoder's text tower
``vision.proj_out``              ``vision.hook_proj_out``               the projector's output (image features
                                                                      as the decoder receives them)
``image_embeds`` / ``text_embeds``  ``hook_image_embeds`` / ``hook_text_embeds``  a dual encoder's pooled, projected
                                                                      embeddings, before normalisation
=============================  =====================================  ====================================

The decoder's names are TransformerLens's (SAELens stores them as an SAE's ``hook_name``); TransformerLens 4's
``TransformerBridge`` names them ``blocks.{L}.hook_in`` / ``hook_out``, keeping the older names as aliases
(TransformerLens docs, "TransformerBridge: hook aliases"), and those are read too. The other streams take the
same names behind their tower's prefix.

The MLP sites are named as Gemma Scope 2's files name them (SAELens' Gemma 3 loader, ``sae_lens/loading/
pretrained_sae_loaders.py``): ``hook_mlp_in`` is the input of the layer's ``mlp`` module, after the pre-feedforward
norm (its ``hf_hook_name``: ``model.layers.{L}.pre_feedforward_layernorm.output``), which TransformerLens 4's
``TransformerBridge`` calls ``blocks.{L}.mlp.hook_in`` (read too). TransformerLens's own ``hook_mlp_in`` is the
residual before that norm, and ``HookedTransformer``'s ``ln2.hook_normalized`` the norm's output before its weight:
tensors vlmsae does not hook. ``hook_mlp_out`` is TransformerLens's: after the post-feedforward norm where
the layer has one, so it is exactly what the MLP adds to the residual. The decoder's MLP sites only: a tower's
layers have none in vlmsae.

A site without layers (``OUTPUT_SITES``) is layer 0: its hook name has no ``blocks.{L}``. Every entry point that takes a layer and a site accepts either spelling; this module only
parses strings and imports no TransformerLens.
"""

from __future__ import annotations

import re

from .errors import SiteError

SITES = ("resid_pre", "resid_post")
"""The decoder's residual sites: the input and the output of a decoder layer."""
MLP_SITES = ("mlp_in", "mlp_out")
"""The decoder layer's MLP: its input (after the pre-MLP norm) and what it adds to the residual stream."""
TOWERS = ("vision", "text")
"""Prefixes of the streams besides the decoder: a vision tower, a dual encoder's text tower."""
TOWER_SITES = tuple(f"{tower}.{site}" for tower in TOWERS for site in SITES)
"""The input and the output of a tower's layer."""
OUTPUT_SITES = ("vision.proj_out", "image_embeds", "text_embeds")
"""Sites at one module's output, without layers (layer 0): the projector, a dual encoder's embeddings."""
ALL_SITES = SITES + MLP_SITES + TOWER_SITES + OUTPUT_SITES
"""Every site name; a model has those of its family (``vlmsae.layers(model).sites``)."""

LENS_HOOKS = {"hook_resid_pre": "resid_pre", "hook_in": "resid_pre",
              "hook_resid_post": "resid_post", "hook_out": "resid_post",
              "hook_mlp_in": "mlp_in", "mlp.hook_in": "mlp_in",
              "hook_mlp_out": "mlp_out"}
"""A hook point of a block (``HookedTransformer`` name, ``TransformerBridge`` name, Gemma Scope 2's) -> its site."""

_HOOK_NAME = re.compile(r"(?:(vision|text)\.)?blocks\.(\d+)\.(\w+(?:\.\w+)*)")
_OUTPUT_NAME = re.compile(r"(?:(vision|text)\.)?hook_(\w+)")


def _tower_site(site):
    """``site`` with a TransformerLens point name behind a tower prefix read too (``vision.hook_out``)."""
    if not isinstance(site, str):
        return site
    tower, dot, point = site.rpartition(".")
    if dot and tower in TOWERS and point in LENS_HOOKS:
        return f"{tower}.{LENS_HOOKS[point]}"
    return LENS_HOOKS.get(site, site)


def parse_site(layer, site: str = "resid_post") -> tuple[int, str]:
    """``(layer, site)`` in vlmsae's spelling, from vlmsae's or a hook name.

    - ``layer`` an int: returned as is; ``site`` is one of ``ALL_SITES`` or a hook point name
      ``"hook_resid_post"`` / ``"hook_out"`` (and the ``_pre`` / ``hook_in`` pair), behind a tower prefix too
      (``"vision.hook_resid_post"``).
    - ``layer`` a hook name, ``"blocks.9.hook_resid_post"``, ``"vision.blocks.3.hook_resid_post"``,
      ``"vision.hook_proj_out"``, ``"hook_image_embeds"``: gives the layer (0 for a site without layers) and the
      site; ``site`` must then be left at its default or name the same site.

    Any other value is returned unchanged, for :func:`vlmsae.hooks.check_sites` to reject with the
    valid range. Raises :class:`~vlmsae.errors.SiteError` for a hook name vlmsae has no site for
    (``blocks.9.hook_resid_mid``, ``blocks.9.attn.hook_z``, ``vision.hook_foo``) or that disagrees with ``site``.
    """
    site = _tower_site(site)
    if not isinstance(layer, str):
        return layer, site
    match = _HOOK_NAME.fullmatch(layer)
    if match is not None:
        tower, index, point = match.groups()
        prefix = f"{tower}." if tower else ""
        if point not in LENS_HOOKS:
            raise SiteError(
                f"{layer!r} names a hook point vlmsae does not hook ({point!r}); vlmsae hooks a layer's input and "
                f"output: {prefix}blocks.{index}.hook_resid_pre or {prefix}blocks.{index}.hook_resid_post, and a "
                f"decoder layer's MLP: blocks.{index}.hook_mlp_in or blocks.{index}.hook_mlp_out")
        named, index = prefix + LENS_HOOKS[point], int(index)
    else:
        match = _OUTPUT_NAME.fullmatch(layer)
        if match is None:
            return layer, site
        tower, point = match.groups()
        named, index = (f"{tower}." if tower else "") + point, 0
        if named not in OUTPUT_SITES:
            raise SiteError(f"{layer!r} is not a site vlmsae hooks; sites without layers: "
                            f"{[hook_name(0, s) for s in OUTPUT_SITES]}")
    if site != "resid_post" and site != named:
        raise SiteError(f"the hook name {layer!r} is site {named!r} but site={site!r} was passed too; "
                        "pass the hook name alone, or a layer index with site=")
    return index, named


def hook_name(layer: int, site: str = "resid_post") -> str:
    """The hook name of a site, as SAELens stores it: ``hook_name(9) == "blocks.9.hook_resid_post"``,
    ``hook_name(3, "vision.resid_post") == "vision.blocks.3.hook_resid_post"``,
    ``hook_name(0, "image_embeds") == "hook_image_embeds"``."""
    tower, dot, point = site.rpartition(".")
    if site in OUTPUT_SITES:
        return f"{tower}{dot}hook_{point}"
    return f"{tower}{dot}blocks.{layer}.hook_{point}"


def reads_input(site: str) -> bool:
    """Whether a site is a module's input (hooked before the module runs) rather than its output."""
    return site.endswith("resid_pre") or site == "mlp_in"


def stream_of(site: str) -> str:
    """The stream whose positions a site holds: ``"decoder"``, ``"vision"`` or ``"text"``."""
    if site in SITES + MLP_SITES:
        return "decoder"
    if site == "text_embeds":
        return "text"
    if site == "image_embeds":
        return "vision"
    return site.partition(".")[0]
