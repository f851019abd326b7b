"""vlmsae's splice, ablate and steer inside an nnsight trace (``pip install "vlmsae[nnsight]"``).

Each function is called inside ``with model.trace(...)`` on the ``nnsight.NNsight`` (or
``LanguageModel``) object being traced, and edits one site of one forward the way the hook path
(:func:`vlmsae.splice`, :func:`vlmsae.ablate`, :func:`vlmsae.steer`) does on the plain model: the same
``where=`` positions (read from the model's own inputs at that forward, ``model.inputs``), the same
error term, the SAE in its own dtype and device and the result in the model's. tests/test_integrations.py
checks that both paths give the same logits, under ``generate()`` too::

    from vlmsae.integrations import nnsight as vn

    traced = nnsight.NNsight(model)
    with traced.trace(**inputs):
        latents = vn.splice(traced, 9, sae, where="image").save()
        logits = traced.output.logits.save()

    with traced.trace(**inputs, max_new_tokens=8, fn=model.generate) as tracer:
        for _ in tracer.iter[0:8]:          # bounded: code after an open-ended iter[:] never runs
            fwd = vn.forward(traced)        # read once per forward when several calls edit it
            vn.steer(traced, 9, sae, latents={12: 8.0}, where="generated", fwd=fwd)
            vn.splice(traced, 12, sae12, use_error_term=True, fwd=fwd)

nnsight 0.8 runs the body of a trace on real tensors as each module executes (nnsight docs,
"Interleaving"), so within one forward a call must come after any read of an earlier module and
before any read of a later one, and a forward's inputs (which give its token kinds) can be read only
once: :func:`forward` reads them, for several calls to share. Under ``generate()`` a forward after the KV cache's positions counts
every position it feeds as generated, as :func:`vlmsae.attach` does under the KV cache; with
``use_cache=False`` each step recomputes the whole sequence and nothing is marked generated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from torch import Tensor, nn

from ..adapters import ModelInfo, layers
from ..checks import check_sae
from ..errors import ConfigError, SiteError, UnsupportedModelError
from ..hooks import Forward, check_sites, describe_forward
from ..interventions import ablation_edit, reconstruct, steering_vector
from ..positions import where_kinds, where_mask
from ..sae import SAE
from ..sites import SITES, parse_site
from . import require


def forward(model) -> Forward:
    """Inside an nnsight trace: the :class:`~vlmsae.hooks.Forward` of the forward now running (its positions and
    their token kinds), read from the model's own inputs (``model.inputs``, nnsight docs "Envoy").

    nnsight lets a forward's inputs be read once, before its layers run: to edit several sites of one
    forward, read it first and pass it to each call as ``fwd=``. Raises
    :class:`~vlmsae.errors.MissingExtraError` without nnsight and
    :class:`~vlmsae.errors.UnsupportedModelError` for a model that is not an nnsight object.
    """
    require("nnsight", "nnsight")
    if isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a plain torch module; pass the nnsight object being traced "
            "(nnsight.NNsight(model)), or use vlmsae.splice / ablate / steer on the model itself")
    info = layers(model)
    args, kwargs = model.inputs  # the root module's call: read before the layer runs
    return describe_forward(info, info.model, args, kwargs)


class _Site:
    """One site of the forward being traced: its model info, :class:`~vlmsae.hooks.Forward` and residual."""

    def __init__(self, model, layer, site: str, fwd: Forward | None):
        self.fwd: Forward = forward(model) if fwd is None else fwd
        self.info: ModelInfo = self.fwd.info
        self.layer, self.site = parse_site(layer, site)
        check_sites(self.info, [(self.layer, self.site)])
        if self.site not in SITES:
            raise SiteError(f"site {self.site!r}: inside an nnsight trace vlmsae reaches decoder sites only ({SITES}); "
                            "use vlmsae.splice / ablate / steer on the model itself for a tower's sites")
        envoy = model
        for part in self.info.layer_path.split("."):  # the adapter's path, walked through nnsight's module tree
            envoy = getattr(envoy, part)
        self.envoy = envoy[self.layer]
        if self.site == "resid_post":
            self.output = self.envoy.output
            self.resid: Tensor = self.output[0] if isinstance(self.output, tuple) else self.output
        else:
            self.resid = self.envoy.input

    def put(self, new: Tensor) -> None:
        """Replace the residual at this site by ``new`` (same shape) for the rest of the forward."""
        if self.site == "resid_pre":
            self.envoy.input = new
        elif isinstance(self.output, tuple):
            self.envoy.output = (new, *self.output[1:])
        else:
            self.envoy.output = new


def splice(model, layer: int | str, sae: SAE, *, use_error_term: bool = False, where=None, site: str = "resid_post",
           edit: Callable[[Tensor, Forward], Tensor] | None = None, fwd: Forward | None = None) -> Tensor:
    """Inside an nnsight trace: replace the residual at ``layer`` by the SAE's reconstruction, as
    :func:`vlmsae.splice` does.

    ``model`` is the ``nnsight.NNsight`` being traced; ``layer`` a decoder layer index or a
    TransformerLens hook name (``"blocks.9.hook_resid_post"``). ``use_error_term=True`` keeps the error term;
    ``edit(latents, fwd) -> latents`` changes latents; ``where`` limits the change to some positions
    (:mod:`vlmsae.positions`). Returns the ``(batch, seq, d_sae)`` latents of this forward at every
    position (call ``.save()`` on them to keep them after the trace). ``fwd`` is this forward's
    :func:`forward`, read once when several calls edit one forward (read here when ``None``).

    Raises :class:`~vlmsae.errors.MissingExtraError` without nnsight,
    :class:`~vlmsae.errors.UnsupportedModelError` for a model that is not an nnsight object,
    :class:`~vlmsae.errors.LayerIndexError` / :class:`~vlmsae.errors.SiteError` for a bad site and
    :class:`~vlmsae.errors.ConfigError` for an SAE of another width or a ``where`` that selects nothing.
    """
    at = _Site(model, layer, site, fwd)
    check_sae(sae, at.info, at.layer, at.site)
    kinds = where_kinds(where, at.info)
    mask = where_mask(where, kinds, at.fwd)
    seen = []

    def keep(latents: Tensor) -> Tensor:
        seen.append(latents)
        return latents if edit is None else edit(latents, at.fwd)

    at.put(reconstruct(at.resid, sae, use_error_term=use_error_term, edit=keep, mask=mask, kinds=at.fwd.kinds))
    return seen[0]


def ablate(model, layer: int | str, sae: SAE, latents: Iterable[int], *, mode: str = "zero",
           means: Tensor | None = None, where=None, site: str = "resid_post", fwd: Forward | None = None) -> Tensor:
    """Inside an nnsight trace: set ``latents`` to zero (or to ``means``, ``mode="mean"``) with the error term
    kept, as :func:`vlmsae.ablate` does. ``means`` is ``(d_sae,)``. Returns the ``(batch, seq, d_sae)`` latents
    before the ablation; ``fwd`` as for :func:`splice`. Raises as :func:`splice`, and :class:`~vlmsae.errors.ConfigError` for a latent index
    out of range or a ``mode`` / ``means`` that do not fit."""
    edit = ablation_edit(sae, latents, mode=mode, means=means)
    return splice(model, layer, sae, use_error_term=True, where=where, site=site, edit=edit, fwd=fwd)


def steer(model, layer: int | str, target, latents: Mapping[int, float] | None = None, *, strength: float = 1.0,
          where=None, relative_to: Tensor | None = None, site: str = "resid_post", fwd: Forward | None = None) -> Tensor:
    """Inside an nnsight trace: add decoder directions of an SAE (``latents={index: strength}``) or a raw
    ``(d_in,)`` direction (``strength * target``) at ``where`` positions, as :func:`vlmsae.steer` does.

    Strengths are latent activations (multiples of ``relative_to[i]`` when given, ``(d_sae,)``). Under
    ``generate()`` call it at every step (``for _ in tracer.iter[0:n]``). Returns the ``(d_in,)`` vector
    added; ``fwd`` as for :func:`splice`. Raises as :func:`splice`, and :class:`~vlmsae.errors.ConfigError` for a vector of another width.
    """
    at = _Site(model, layer, site, fwd)
    if isinstance(target, SAE):
        check_sae(target, at.info, at.layer, at.site)
    per_kind = isinstance(target, SAE) and target.cfg.normalize_per_kind  # one vector per position's token kind
    vector = steering_vector(target, latents, strength=strength, relative_to=relative_to,
                             kinds=at.fwd.kinds if per_kind else None)
    if vector.shape[-1] != at.info.d_model:
        raise ConfigError(f"a steering vector of width {vector.shape[-1]} does not fit d_model={at.info.d_model}")
    mask = where_mask(where, where_kinds(where, at.info), at.fwd).to(at.resid.device)
    at.put(at.resid + mask[..., None].to(at.resid.dtype) * vector.to(at.resid.device, at.resid.dtype))
    return vector
