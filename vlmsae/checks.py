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


def check_entry(model: Model, layer: int | str, site: str, sae: SAE | None = None) -> tuple[ModelInfo, int, str]:
    """The model's info and the site in vlmsae's spelling, checked: what every entry point runs first.

    ``layer`` is a layer index or a hook name (:func:`vlmsae.sites.parse_site`), of any site the model has.

    Raises:
        UnsupportedModelError: the model is not a supported family.
        LayerIndexError, SiteError: a bad layer or site (:func:`vlmsae.hooks.check_sites`).
        ConfigError: the SAE's ``d_in`` is not the site's width (``info.width(site)``).

    Warns:
        HookNameWarning: the SAE's ``hook_name`` metadata names another site.
    """
    info = layers(model)
    layer, site = parse_site(layer, site)
    check_sites(info, [(layer, site)])
    if sae is not None:
        check_sae(sae, info, layer, site, stacklevel=4)
    return info, layer, site


def check_sae(sae: SAE, info: ModelInfo, layer: int, site: str, stacklevel: int = 3) -> None:
    """Raise ``ConfigError`` if the SAE's width is not the model's; warn if it belongs to another site.

    The warning (:class:`~vlmsae.errors.HookNameWarning`) names the SAE's own ``hook_name`` and the
    site it is used at: an SAE trained on layer 2 spliced at layer 1 runs, but means little.
    """
    width = info.width(site)
    if sae.cfg.d_in != width:
        what = "residual has d_model" if site in ("resid_pre", "resid_post") else f"{site} site has width"
        raise ConfigError(
            f"the SAE reads d_in={sae.cfg.d_in} but this {info.family} model's {what}={width}; "
            "use an SAE trained on this model (or one of the same width)")
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
