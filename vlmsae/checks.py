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


def check_labels(labels, scanned: Iterable[int]) -> dict[int, str]:
    """Latent labels as ``{latent: text}``: from a mapping latent -> str, or a DataFrame with a ``label`` column
    indexed by latent (:mod:`vlmsae.explain`'s tables). Missing (``None`` / NaN) and blank labels are left out.

    Raises:
        ConfigError: a label is for a latent not in ``scanned``, a key is not a latent index, a value is not text,
            or a DataFrame has no ``label`` column.
    """
    if labels is None:
        return {}
    if hasattr(labels, "columns"):  # a DataFrame
        if "label" not in labels.columns:
            raise ConfigError(f"the labels table has columns {list(labels.columns)}; give it a 'label' column "
                              "(index: latent), or pass a mapping latent -> label")
        labels = labels["label"]
    items = labels.items() if hasattr(labels, "items") else None
    if items is None:
        raise ConfigError(f"labels={type(labels).__name__}: pass a mapping latent -> label or a DataFrame with a "
                          "'label' column")
    known, out, unknown = set(int(i) for i in scanned), {}, []
    for key, text in items:
        if hasattr(key, "item"):
            key = key.item()
        if isinstance(key, bool) or not isinstance(key, int):
            raise ConfigError(f"labels key {key!r} is not a latent index; key labels by latent (int)")
        if text is None or (isinstance(text, float) and text != text):
            continue
        if not isinstance(text, str):
            raise ConfigError(f"label of latent {key} is {type(text).__name__} {text!r}; labels are text (str)")
        if key not in known:
            unknown.append(key)
        elif text.strip():
            out[key] = text
    if unknown:
        raise ConfigError(f"labels for latents {sorted(unknown)[:10]} that the scan did not keep examples for; "
                          "scan them (scan(..., latents=)) or drop their labels")
    return out
