"""A vlmsae SAE on a TransformerLens 4 ``TransformerBridge`` (``pip install "vlmsae[lens]"``).

The bridge wraps a Hugging Face model and names its residual stream by hook points,
``blocks.{L}.hook_resid_post`` (an alias of ``blocks.{L}.hook_out``; TransformerLens docs,
"TransformerBridge"). :func:`splice_hook` is a TransformerLens hook function that puts the SAE's
reconstruction back at such a point, computed as :func:`vlmsae.reconstruct` computes it for
:func:`vlmsae.splice`; :func:`splice` is the context manager that adds it through ``bridge.hooks``
and removes it on exit. tests/test_integrations.py checks both against :func:`vlmsae.splice` on the
model the bridge wraps::

    from vlmsae.integrations import lens

    with lens.splice(bridge, "blocks.9.hook_resid_post", sae) as s:   # or lens.splice(bridge, 9, sae)
        logits = bridge(tokens)
    s.latents                                                         # (batch, seq, d_sae), last forward

    bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.9.hook_resid_post", lens.splice_hook(sae, use_error_term=True))])

A bridge hook sees only the tensor, not the token ids, so positions are chosen by ``mask``, a
``(batch, seq)`` bool: ``vlmsae.layers(model).kinds(ids, attention_mask) != vlmsae.Kind.PAD`` leaves
padding alone as :func:`vlmsae.splice` does, ``== vlmsae.Kind.IMAGE`` splices image positions only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor

from ..errors import ConfigError, HookNameWarning, SiteError, UnsupportedModelError
from ..interventions import reconstruct
from ..sae import SAE
from ..sites import SITES, hook_name, parse_site
from . import require


class LensSplice:
    """A splice on a bridge in progress: ``latents`` of the last forward through the hook point."""

    def __init__(self, name: str):
        self.name = name
        """The hook point spliced, in TransformerLens's spelling (``blocks.9.hook_resid_post``)."""
        self.latents: Tensor | None = None
        """``(batch, seq, d_sae)`` latents of the last forward, at every position."""


def splice_hook(sae: SAE, *, use_error_term: bool = False, edit: Callable[[Tensor], Tensor] | None = None,
                mask: Tensor | None = None, state: LensSplice | None = None) -> Callable[[Tensor, object], Tensor]:
    """A TransformerLens forward hook ``fn(resid, hook) -> resid`` that splices ``sae`` in.

    ``resid`` is ``(batch, seq, d_in)`` at a residual hook point; the hook returns it with the SAE's
    reconstruction in place (``use_error_term=True``: the error term kept, so only ``edit(latents) -> latents``
    changes it), at the positions of ``mask`` ``(batch, seq)`` bool (all when ``None``), in ``resid``'s
    dtype and device. ``state.latents`` gets each forward's latents. Raises
    :class:`~vlmsae.errors.ConfigError` when ``resid`` is not ``sae.cfg.d_in`` wide or ``mask`` is not
    ``(batch, seq)``.
    """

    def hook(resid: Tensor, hook=None) -> Tensor:
        if mask is not None and tuple(mask.shape) != tuple(resid.shape[:-1]):
            raise ConfigError(f"mask has shape {tuple(mask.shape)} but the residual at {getattr(hook, 'name', None)!r} "
                              f"is {tuple(resid.shape)}; pass a (batch, seq) bool mask for these inputs")

        def keep(latents: Tensor) -> Tensor:
            if state is not None:
                state.latents = latents
            return latents if edit is None else edit(latents)

        return reconstruct(resid, sae, use_error_term=use_error_term, edit=keep, mask=mask)
    return hook


@contextmanager
def splice(bridge, layer: int | str, sae: SAE, *, use_error_term: bool = False, mask: Tensor | None = None,
           site: str = "resid_post", edit: Callable[[Tensor], Tensor] | None = None) -> Iterator[LensSplice]:
    """Splice ``sae`` at a residual hook point of ``bridge`` on every forward inside the block.

    ``layer`` is a decoder layer index (with ``site`` ``"resid_post"`` or ``"resid_pre"``) or a
    TransformerLens hook name (``"blocks.9.hook_resid_post"``, ``"blocks.9.hook_out"``). The hook is
    added with ``bridge.hooks(fwd_hooks=...)``, which removes it on exit, after an exception too.
    Yields a :class:`LensSplice`. Raises :class:`~vlmsae.errors.MissingExtraError` without
    TransformerLens, :class:`~vlmsae.errors.UnsupportedModelError` when ``bridge`` is not a
    ``TransformerBridge``, :class:`~vlmsae.errors.ConfigError` when the SAE's ``d_in`` is not the
    bridge's ``d_model``; warns :class:`~vlmsae.errors.HookNameWarning` when the SAE's metadata says it
    was trained at another hook point.
    """
    require("transformer_lens", "lens")
    from transformer_lens.model_bridge import TransformerBridge

    if parse_site(layer, site)[1] not in SITES:  # hook_mlp_in is another tensor in TransformerLens (vlmsae.sites)
        raise SiteError(f"{layer!r}, site={site!r}: the lens splice reaches the residual hook points only ({SITES}); "
                        "splice at an MLP site with vlmsae.splice on the Hugging Face model")
    if not isinstance(bridge, TransformerBridge):
        raise UnsupportedModelError(
            f"{type(bridge).__name__} is not a TransformerLens TransformerBridge; boot one with "
            "TransformerBridge.boot_transformers(...), or use vlmsae.splice on the Hugging Face model itself")
    layer, site = parse_site(layer, site)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < bridge.cfg.n_layers:
        raise ConfigError(f"layer={layer!r} is not a block of this bridge; valid: 0..{bridge.cfg.n_layers - 1} "
                          "or a hook name such as 'blocks.0.hook_resid_post'")
    if sae.cfg.d_in != bridge.cfg.d_model:
        raise ConfigError(f"the SAE reads d_in={sae.cfg.d_in} but this bridge has d_model={bridge.cfg.d_model}; "
                          "use an SAE trained on this model (or one of the same width)")
    name = hook_name(layer, site)
    trained_at = sae.metadata.get("hook_name")
    try:
        trained_site = parse_site(trained_at) if trained_at is not None else (layer, site)
    except SiteError:  # a hook point vlmsae has no site for, so not this one
        trained_site = None
    if trained_site != (layer, site):
        warnings.warn(f"this SAE was trained at {trained_at!r} (hook_name in its metadata) but is used at {name!r}; "
                      "pass the hook point it was trained at", HookNameWarning, stacklevel=3)
    state = LensSplice(name)
    with bridge.hooks(fwd_hooks=[(name, splice_hook(sae, use_error_term=use_error_term, edit=edit, mask=mask, state=state))]):
        yield state
