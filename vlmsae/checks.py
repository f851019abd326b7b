"""The checks every entry point that takes a model, a layer and an SAE runs first (splice, steer,
evaluate, latent_stats, scan, ...), kept apart so that analysis does not import the interventions."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from .adapters import Model, ModelInfo, layers
from .errors import ConfigError, HookNameWarning, SiteError
from .hooks import check_sites
from .sae import SAE
from .sites import parse_site


def check_entry(model: Model, layer: int | str | None, site: str, sae: SAE | None = None) -> tuple[ModelInfo, int, str]:
    """The model's info and the site in vlmsae's spelling, checked: what every entry point runs first.

    ``layer`` is a layer index or a hook name (:func:`vlmsae.sites.parse_site`), of any site the model has, or
    ``None``: the site the SAE's metadata names (``hook_name``, as SAELens stores it). A transcoder's site is the one
    it reads; left at ``"resid_post"`` (the default) beside a layer index, it is its metadata's (``mlp_in`` at that
    layer without metadata). Where a transcoder writes is :func:`output_site`.

    Raises:
        UnsupportedModelError: the model is not a supported family.
        LayerIndexError, SiteError: a bad layer or site (:func:`vlmsae.hooks.check_sites`), or a ``hook_name`` /
            ``hook_name_out`` in the metadata that vlmsae does not hook.
        ConfigError: the SAE's ``d_in`` is not the site's width (``info.width(site)``), a transcoder's ``d_out``
            is not its output site's, ``layer=None`` and no ``hook_name`` in the metadata, or an MGSAE (its
            ``to_sae(modality)`` is what these take).

    Warns:
        HookNameWarning: the SAE's ``hook_name`` metadata names another site.
    """
    info = layers(model)
    if layer is None:
        layer = _metadata_name(sae, "hook_name")
    elif sae is not None and sae.is_transcoder and site == "resid_post" and not isinstance(layer, str):
        name = sae.metadata.get("hook_name")
        site = parse_site(name)[1] if isinstance(name, str) else "mlp_in"
    if sae is not None and sae.cfg.architecture == "mgsae":
        raise ConfigError("an MGSAE encodes each modality with its own biases; splice, ablate, steer or evaluate "
                          "sae.to_sae('image') (or 'text'), a plain SAE of that modality, at its site")
    layer, site = parse_site(layer, site)
    check_sites(info, [(layer, site)])
    if sae is not None:
        check_sae(sae, info, layer, site, stacklevel=4)
    return info, layer, site


def _metadata_name(sae: SAE | None, key: str) -> str:
    """The hook name the SAE's metadata holds under ``key``. Raises ``ConfigError`` when there is none."""
    name = None if sae is None else sae.metadata.get(key)
    if not isinstance(name, str):
        raise ConfigError(f"layer=None takes the site from the SAE's metadata[{key!r}], but it holds {name!r}; pass "
                          "the layer (and site=), or set the metadata, e.g. 'blocks.9.hook_resid_post'")
    return name


def output_site(sae: SAE, layer: int, site: str) -> str:
    """The site the SAE writes when it reads ``site`` of ``layer``: ``site`` itself for an SAE; for a transcoder, the
    site of its metadata's ``hook_name_out`` (``blocks.L.hook_mlp_out`` -> ``mlp_out``), ``mlp_out`` without one, at the
    same layer.

    Raises:
        SiteError: ``hook_name_out`` names a hook point vlmsae does not hook.
        ConfigError: ``hook_name_out`` is at another layer than ``hook_name`` (a cross-layer transcoder).
    """
    if not sae.is_transcoder:
        return site
    name = sae.metadata.get("hook_name_out")
    if name is None:
        return "mlp_out"
    out_layer, out = parse_site(_metadata_name(sae, "hook_name_out"))
    in_name = sae.metadata.get("hook_name")
    if isinstance(in_name, str) and parse_site(in_name)[0] != out_layer:
        raise ConfigError(f"this transcoder reads {in_name!r} and writes {name!r}, another layer; vlmsae splices "
                          "transcoders within one layer (not cross-layer transcoders)")
    return out


def check_sae(sae: SAE, info: ModelInfo, layer: int, site: str, stacklevel: int = 3) -> None:
    """Raise ``ConfigError`` if the SAE's width is not the model's; warn if it belongs to another site.

    The warning (:class:`~vlmsae.errors.HookNameWarning`) names the SAE's own ``hook_name`` and the
    site it is used at: an SAE trained on layer 2 spliced at layer 1 runs, but means little. A transcoder's
    output site (:func:`output_site`) must be a site of the model of width ``d_out``.
    """
    width = info.width(site)
    if sae.cfg.d_in != width:
        what = "residual has d_model" if site in ("resid_pre", "resid_post") else f"{site} site has width"
        raise ConfigError(
            f"the SAE reads d_in={sae.cfg.d_in} but this {info.family} model's {what}={width}; "
            "use an SAE trained on this model (or one of the same width)")
    if sae.is_transcoder:
        out = output_site(sae, layer, site)
        check_sites(info, [(layer, out)])
        if sae.cfg.d_out != info.width(out):
            raise ConfigError(f"the transcoder writes d_out={sae.cfg.d_out} but this {info.family} model's {out} site "
                              f"has width {info.width(out)}; use a transcoder trained on this model")
    trained_at, used_at = sae.metadata.get("hook_name"), info.hook_name(layer, site)
    if trained_at is not None and _same_site(trained_at) != (layer, site):
        warnings.warn(
            f"this SAE was trained at {trained_at!r} (hook_name in its metadata) but is used at {used_at!r}; "
            f"pass the layer and site it was trained at, or set sae.metadata['hook_name'] = {used_at!r} if its "
            "metadata is wrong", HookNameWarning, stacklevel=stacklevel)


def _same_site(name) -> tuple:
    """The ``(layer, site)`` a ``hook_name`` stands for, in either TransformerLens spelling (hook_out is hook_resid_post)."""
    try:
        return parse_site(name)
    except SiteError:
        return (name,)


def check_latents(latents: Iterable[int], d_sae: int) -> list[int]:
    """The latent indices as a list.

    Raises:
        ConfigError: an index is not an integer in ``0..d_sae - 1``.
    """
    latents = list(latents)
    bad = [i for i in latents if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < d_sae]
    if bad:
        raise ConfigError(f"latent index {bad[0]!r} is out of range; this SAE has latents 0..{d_sae - 1}")
    return latents
