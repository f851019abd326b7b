"""The checks every entry point that takes a model, a layer and an SAE runs first (splice, steer,
evaluate, latent_stats, scan, ...), kept apart so that analysis does not import the interventions."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from .adapters import ModelInfo
from .errors import ConfigError, HookNameWarning, SiteError
from .sae import SAE
from .sites import parse_site


def check_sae(sae: SAE, info: ModelInfo, layer: int, site: str) -> None:
    """Raise ``ConfigError`` if the SAE's width is not the model's; warn if it belongs to another site.

    The warning (:class:`~vlmsae.errors.HookNameWarning`) names the SAE's own ``hook_name`` and the
    site it is used at: an SAE trained on layer 2 spliced at layer 1 runs, but means little.
    """
    if sae.cfg.d_in != info.d_model:
        raise ConfigError(
            f"the SAE reads d_in={sae.cfg.d_in} but this {info.family} model's residual has d_model={info.d_model}; "
            "use an SAE trained on this model (or one of the same width)")
    trained_at, used_at = sae.metadata.get("hook_name"), info.hook_name(layer, site)
    if trained_at is not None and _same_site(trained_at) != (layer, site):
        warnings.warn(
            f"this SAE was trained at {trained_at!r} (hook_name in its metadata) but is used at {used_at!r}; "
            f"pass the layer and site it was trained at, or set sae.metadata['hook_name'] = {used_at!r} if its "
            "metadata is wrong", HookNameWarning, stacklevel=3)


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
