"""Put an SAE into the running model: splice, ablate, steer.

Every intervention is one hook at one site, through :func:`vlmsae.attach`, so each is a context
manager that removes itself in ``finally`` and acts on every forward inside it, each decode step
of ``generate()`` included. Where several are open at one site, the outer one acts first
(hooks run in the order they were attached).

``where`` chooses the positions an intervention touches (:mod:`vlmsae.positions`: ``None`` for
every non-pad position, kind names, or a callable). Under ``generate()`` the prompt is
what ``generate()`` was given; the first new token is predicted at the last prompt position, so
``"generated"`` first changes the second new token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .adapters import Kind, Model
from .checks import check_entry, check_latents, output_site
from .deprecation import renamed_kwargs
from .errors import ConfigError, SiteError
from .hooks import Forward, attach, execution_device
from .metrics import SpliceStats, kind_stats
from .positions import Where, where_kinds, where_mask
from .record import record
from .sae import SAE


def _put_back(x: Tensor, sae: SAE, latents: Tensor, edited: Tensor, recon: Tensor, use_error_term: bool,
              kinds: Tensor | None = None) -> Tensor:
    """The residual to put back, on the SAE's device in ``x``'s dtype; ``recon`` is ``decode(latents, kinds)``.

    With the error term, ``recon(edited) + (x - recon)`` is computed as ``x + (recon(edited) - recon)``
    so that no edit gives back ``x`` exactly.
    """
    if use_error_term:
        return x if edited is latents else x + (sae.decode(edited, kinds) - recon).to(x.dtype)
    return (recon if edited is latents else sae.decode(edited, kinds)).to(x.dtype)


@renamed_kwargs(error="use_error_term")
def reconstruct(resid: Tensor, sae: SAE, *, use_error_term: bool = False, edit: Callable[[Tensor], Tensor] | None = None,
                mask: Tensor | None = None, kinds: Tensor | None = None) -> Tensor:
    """What a splice puts back, in ``resid``'s dtype and device: for an nnsight trace or a hook of your own.

    ``resid`` is ``(..., d_in)``; ``edit(latents) -> latents`` changes the ``(..., d_sae)`` latents;
    ``use_error_term=True`` keeps the SAE's error term (``x + decode(edited) - decode(latents)``, SAELens'
    ``use_error_term``); ``mask`` ``(batch, seq)`` bool limits the change to some positions (a splice
    leaves padding alone: pass ``vlmsae.layers(model).kinds(ids, attention_mask) != Kind.PAD`` to do the same);
    ``kinds`` ``(...)`` the :class:`Kind` of each position, which an SAE with ``normalize_per_kind`` needs.

    Raises:
        ConfigError: ``resid``'s last dimension is not the SAE's ``d_in``, or ``sae`` is a transcoder (it writes
            another tensor than it reads: splice it, or take ``sae(x).recon``), or the SAE normalises per token
            kind and ``kinds`` is missing or of another shape.
    """
    if sae.is_transcoder:
        raise ConfigError("reconstruct() puts back the tensor it reads; a transcoder predicts another site (the MLP's "
                          "output): use vlmsae.splice, or transcoder(x).recon for the prediction itself")
    if resid.shape[-1] != sae.cfg.d_in:
        raise ConfigError(
            f"the SAE reads d_in={sae.cfg.d_in} but this residual has width {resid.shape[-1]} (shape "
            f"{tuple(resid.shape)}); pass the residual of the layer the SAE was trained on, or an SAE of that width")
    with torch.no_grad():
        x = resid.to(sae.W_dec.device)
        kinds = None if kinds is None else kinds.to(x.device)
        latents = sae.encode(x, kinds)
        edited = latents if edit is None else edit(latents)
        new = _put_back(x, sae, latents, edited, sae.decode(latents, kinds), use_error_term, kinds)
        if mask is not None:
            new = torch.where(mask[..., None].to(x.device), new, x)
        return new.to(resid.device, resid.dtype)


def place(model: Model, layer: int, sae: SAE, *, site: str = "resid_post") -> SAE:
    """Move ``sae`` in place onto the device that ``layer`` computes on, and return it (dtype unchanged).

    Every intervention runs the SAE where the SAE is and hands the result back on the layer's device;
    on a model spread over devices (accelerate's ``device_map`` / ``dispatch_model``, ``cpu_offload``,
    ``disk_offload``) that is one copy of the residual each way per forward, unless the SAE sits on
    the layer's execution device: which is not where the layer's weights are stored (``meta`` when
    offloaded) nor ``model.device``. After ``place``, a splice / ablate / steer at this layer moves no
    activation between devices, and ``Splice.latents``, :func:`latent_stats` and ``scan`` results are
    on that device. ``resid_pre`` of a layer is on the same device as its ``resid_post``.

    Raises:
        LayerIndexError: ``layer`` is outside the site's layers (``0..n_layers - 1`` in the decoder).
        SiteError: ``site`` is not a site of the model (``vlmsae.layers(model).sites``).
        ConfigError: the SAE's ``d_in`` is not the site's width (``d_model`` at the decoder), or nothing tells where the layer
            runs (no accelerate hook on it or its submodules, and every weight on ``meta``).
        UnsupportedModelError: the model is not a supported family.

    Warns:
        HookNameWarning: the SAE's ``hook_name`` metadata names another site.
    """
    info, layer, site = check_entry(model, layer, site, sae)
    device = execution_device(info.stack(site).modules[layer])
    if device is None:
        raise ConfigError(f"layer {layer} of this {info.family} model has every weight on 'meta' and no accelerate "
                          "hook saying where it runs; load or dispatch the model first, or move the SAE with sae.to()")
    return sae.to(device)


class Splice:
    """A splice in progress: ``s.latents`` of the last forward and running FVU / L0 per token kind."""

    FIRED_CHUNK = 1024
    """Tokens per matmul when counting firing latents per kind (a float32 block of ``FIRED_CHUNK x d_sae``)."""

    def __init__(self, sae: SAE, d_in: int, device):
        self.sae = sae
        self.latents: Tensor | None = None
        """``(batch, seq, d_sae)`` latents of the last forward inside the splice, at every position."""
        n = len(Kind)
        zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=torch.float64)  # noqa: E731
        self._sums = SpliceStats(zeros(n), zeros(n), zeros(n, d_in), zeros(n), zeros(n), zeros(n, sae.cfg.d_sae))

    def _accumulate(self, x: Tensor, recon: Tensor, latents: Tensor, kinds: Tensor, mask: Tensor) -> None:
        onehot = torch.nn.functional.one_hot(kinds.long(), len(Kind)).to(torch.float64)  # (b, s, kinds)
        onehot = onehot * mask[..., None]
        x64 = x.to(torch.float64)
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
        w = flat(onehot)
        err = (x64 - recon.to(x64.device, torch.float64)).pow(2).sum(-1).reshape(-1)
        s = self._sums
        s.tokens.add_(w.sum(0))
        s.squared_error.add_(w.T @ err)
        s.sum_x.add_(w.T @ flat(x64))
        s.sum_sq_x.add_(w.T @ x64.pow(2).sum(-1).reshape(-1))
        s.l0.add_(w.T @ (latents != 0).sum(-1).reshape(-1).to(torch.float64).to(w.device))
        flat_latents, w32 = flat(latents), w.to(latents.device, torch.float32)
        for start in range(0, flat_latents.shape[0], self.FIRED_CHUNK):  # counts < 2**24: exact in float32
            rows = slice(start, start + self.FIRED_CHUNK)
            s.fired.add_((w32[rows].T @ (flat_latents[rows] != 0).float()).to(s.fired))

    @property
    def sums(self) -> SpliceStats:
        """The running sums per token kind behind :meth:`stats`, on the SAE's device; sums of several splices add."""
        return self._sums

    def stats(self) -> pd.DataFrame:
        """FVU, L0 and token count per token kind that was spliced, plus ``all``."""
        return kind_stats(self._sums)


_ACTIVE: set[tuple[int, int, str, int]] = set()  # (id(model), layer, site, id(sae)) of open splices


@renamed_kwargs(error="use_error_term")
@contextmanager
def splice(model: Model, layer: int | str | None, sae: SAE, *, use_error_term: bool = False, where: Where = None,
           site: str = "resid_post", edit: Callable[[Tensor, Forward], Tensor] | None = None,
           special_ids: Iterable[int] | None = None) -> Iterator[Splice]:
    """Replace the residual at ``layer`` by the SAE's reconstruction on every forward inside the block.

    ``layer`` and ``site`` name any site of the model (a decoder layer, a vision tower's, the projector's output,
    a dual encoder's embeddings, a decoder layer's MLP; or the hook name alone:
    ``splice(model, "vision.blocks.3.hook_resid_post", sae)``); ``layer=None`` splices where the SAE's metadata says
    (its ``hook_name``: ``splice(model, None, sae)``).

    A transcoder (:class:`vlmsae.Transcoder`) reads the MLP's input and replaces the MLP's output by its
    prediction (the sites its metadata names, ``hook_name`` and ``hook_name_out``; ``mlp_in`` and ``mlp_out`` of
    ``layer`` without it; see :func:`vlmsae.checks.check_entry`); ``use_error_term``, ``edit``, ``where`` and the
    stats then apply to the MLP's output (FVU: of the prediction against the MLP's own output).

    ``use_error_term=True`` keeps the error term (SAELens' name), so downstream sees the original residual
    except for what ``edit(latents, fwd) -> latents`` changes (latents ``(batch, seq, d_sae)``). ``where``
    restricts the splice to some positions. The SAE runs in its own dtype and device; the result goes
    back in the model's dtype onto the layer's device (:func:`place` puts the SAE there). Yields a :class:`Splice`: ``s.latents`` of the last forward, ``s.stats()`` FVU
    and L0 per token kind. ``special_ids`` are token ids counted as SPECIAL besides the config's (a chat template's
    control tokens: :func:`vlmsae.special_token_ids` with the tokenizer), for ``where`` and the stats.

    Raises:
        LayerIndexError: ``layer`` is outside the site's layers (``0..n_layers - 1`` in the decoder).
        SiteError: ``site`` is not a site of the model (``vlmsae.layers(model).sites``).
        ConfigError: the SAE's ``d_in`` is not the site's width (``d_model`` at the decoder), or ``where`` selects no token.
        SiteError: this SAE is already spliced at this site of this model.
        UnsupportedModelError: the model is not a supported family.

    Warns:
        HookNameWarning: the SAE's ``hook_name`` metadata names another site.
    """
    info, layer, site = check_entry(model, layer, site, sae)
    out = output_site(sae, layer, site)
    kinds = where_kinds(where, info, out)
    key = (id(info.model), layer, site, id(sae))
    if key in _ACTIVE:
        raise SiteError(f"this SAE is already spliced at layer {layer} ({site}) of this model; "
                        "splicing it twice would reconstruct a reconstruction — close the outer splice first")
    state = Splice(sae, info.width(out), sae.W_dec.device)
    read: dict[str, Tensor] = {}  # a transcoder's input in this layer call, kept until the MLP's output comes

    @torch.no_grad()
    def hook(resid: Tensor, fwd: Forward) -> Tensor:
        x = resid.to(sae.W_dec.device)  # what the SAE writes over (the MLP's output for a transcoder) ...
        kinds_here = fwd.kinds.to(x.device)  # normalize_per_kind: each position's kind picks its mean and scale
        latents = sae.encode(read.pop("x").to(x.device) if read else x, kinds_here)  # ... and what it reads
        state.latents = latents
        edited = latents if edit is None else edit(latents, fwd)
        mask = where_mask(where, kinds, fwd).to(x.device)
        recon = sae.decode(latents, kinds_here)
        state._accumulate(x, recon, latents, kinds_here, mask)
        new = _put_back(x, sae, latents, edited, recon, use_error_term, kinds_here)
        if new is x:
            return None  # error term kept and nothing edited: the residual stays bit-for-bit
        return torch.where(mask[..., None], new, x).to(resid.device)

    def keep(x: Tensor, fwd: Forward) -> None:
        read["x"] = x

    fns = {(layer, out): hook}
    if out != site:
        fns[(layer, site)] = keep  # the MLP's input comes first in the layer's call
    _ACTIVE.add(key)
    try:
        with attach(model, fns, special_ids=special_ids):
            yield state
    finally:
        _ACTIVE.discard(key)


@renamed_kwargs(features="latents")
@contextmanager
def ablate(model: Model, layer: int | str | None, sae: SAE, latents: Iterable[int], *, mode: str = "zero",
           means: Tensor | None = None, where: Where = None, site: str = "resid_post",
           special_ids: Iterable[int] | None = None) -> Iterator[Splice]:
    """Set ``latents`` to zero (or to their mean activation, ``mode="mean"``) with the error term kept.

    Only those latents change: the residual moves by ``(new - activation) * W_dec[i]`` per latent ``i``.
    ``means`` is ``(d_sae,)``, e.g. ``latent_stats(model, layer, sae, data).mean``. ``special_ids`` as in :func:`splice`.

    Raises:
        ConfigError: a latent index outside ``0..d_sae - 1``, an unknown ``mode``, or ``mode="mean"``
            without ``means`` of shape ``(d_sae,)``; and everything :func:`splice` raises.
    """
    edit = ablation_edit(sae, latents, mode=mode, means=means)
    with splice(model, layer, sae, use_error_term=True, where=where, site=site, edit=edit,
                special_ids=special_ids) as state:
        yield state


def ablation_edit(sae: SAE, latents: Iterable[int], *, mode: str = "zero",
                  means: Tensor | None = None) -> Callable[[Tensor, Forward], Tensor] | None:
    """The ``edit(latents, fwd)`` that :func:`ablate` splices in: ``latents`` set to 0 or to ``means[i]``.

    ``None`` when no latent is chosen (nothing to edit). ``means`` is ``(d_sae,)``.

    Raises:
        ConfigError: a latent index outside ``0..d_sae - 1``, an unknown ``mode``, or ``mode="mean"``
            without ``means`` of shape ``(d_sae,)``.
    """
    chosen = check_latents(latents, sae.cfg.d_sae)
    if mode not in ("zero", "mean"):
        raise ConfigError(f"mode={mode!r} is not an ablation; use 'zero' or 'mean'")
    if mode == "mean" and (means is None or tuple(means.shape) != (sae.cfg.d_sae,)):
        raise ConfigError(f"mode='mean' needs means= of shape ({sae.cfg.d_sae},), e.g. "
                          "vlmsae.latent_stats(model, layer, sae, data).mean")
    if not chosen:
        return None
    index = torch.tensor(chosen, dtype=torch.long, device=sae.W_dec.device)

    def edit(codes: Tensor, fwd: Forward) -> Tensor:
        codes = codes.clone()
        codes[..., index] = 0 if mode == "zero" else means.to(codes)[index]
        return codes
    return edit


@renamed_kwargs(features="latents")
def steering_vector(target, latents: Mapping[int, float] | None = None, *, strength: float = 1.0,
                    relative_to: Tensor | None = None, kinds: Tensor | None = None) -> Tensor:
    """``(d_in,)`` float32 vector to add: ``sum_i strength_i * W_dec[i]`` in the model's units, or ``strength * target``.

    ``latents`` maps latent index -> strength in latent activation units. ``relative_to`` (``(d_sae,)``,
    e.g. ``latent_stats(...).mean_firing``) makes each strength a multiple of that latent's typical
    activation instead of an absolute activation. An SAE with ``normalize_per_kind`` has one scale per token kind,
    so its directions in the model's units depend on the kind: pass ``kinds`` (a :class:`Kind` tensor of any shape
    ``(...)``) and get ``(..., d_in)``, each position's vector (``kinds=torch.tensor(Kind.TEXT)``: ``(d_in,)``).

    Raises:
        ConfigError: an SAE without ``latents``, a bad latent index, ``latents`` with a raw direction,
            a direction that is not ``(d_in,)``, or a ``target`` that is neither an SAE nor a tensor.
    """
    if isinstance(target, SAE):
        if not latents:
            raise ConfigError("steering with an SAE needs latents={index: strength}, e.g. {12: 8.0}")
        index = check_latents(latents, target.cfg.d_sae)
        with torch.no_grad():
            s = torch.tensor([float(latents[i]) for i in index], device=target.W_dec.device)
            if relative_to is not None:
                s = s * relative_to.to(s.device, torch.float32)[index]
            scale = target.unit_scale(kinds).float()  # (), or (...) per token kind
            if scale.dim() == 0:
                return s @ (target.W_dec[index].float() / scale)
            return (s @ target.W_dec[index].float()) / scale[..., None]
    if isinstance(target, Tensor):
        if latents:
            raise ConfigError("latents= applies to an SAE; for a raw direction pass strength= only")
        if target.ndim != 1:
            raise ConfigError(f"a steering direction must be (d_in,), got shape {tuple(target.shape)}")
        return strength * target.detach().float()
    raise ConfigError(f"steer() takes an SAE or a (d_in,) tensor, not {type(target).__name__}")


@renamed_kwargs(features="latents")
@contextmanager
def steer(model: Model, layer: int | str | None, target: SAE | Tensor, latents: Mapping[int, float] | None = None, *,
          strength: float = 1.0, where: Where = None, relative_to: Tensor | None = None,
          site: str = "resid_post", special_ids: Iterable[int] | None = None) -> Iterator[Tensor]:
    """Add decoder directions (or a raw vector) at ``where`` positions on every forward inside the block.

    ``target`` is an SAE (with ``latents={index: strength}``) or a ``(d_model,)`` direction (with
    ``strength``); see :func:`steering_vector`. Under ``generate()`` the vector is added to the new
    position at every decode step, not only to the prompt. Yields the ``(d_in,)`` vector added (an SAE with
    ``normalize_per_kind`` adds each position's kind's vector, :func:`steering_vector` with ``kinds``; it yields the
    text positions'). ``special_ids`` as in :func:`splice`.

    Raises:
        LayerIndexError: ``layer`` is outside the site's layers (``0..n_layers - 1`` in the decoder).
        SiteError: ``site`` is not a site of the model (``vlmsae.layers(model).sites``).
        ConfigError: the vector's width is not the site's (``d_model`` at the decoder), ``where`` selects no token, or
            anything :func:`steering_vector` rejects.
        UnsupportedModelError: the model is not a supported family.
    """
    info, layer, site = check_entry(model, layer, site, target if isinstance(target, SAE) else None)
    if isinstance(target, SAE):
        site = output_site(target, layer, site)  # a transcoder's decoder directions live where it writes
    per_kind = isinstance(target, SAE) and target.cfg.normalize_per_kind
    text = torch.tensor(int(Kind.TEXT)) if per_kind else None
    vector = steering_vector(target, latents, strength=strength, relative_to=relative_to, kinds=text)
    if vector.shape[0] != info.width(site):
        what = "d_model" if site in ("resid_pre", "resid_post") else f"the width of {site}"
        raise ConfigError(f"a steering vector of width {vector.shape[0]} does not fit {what}={info.width(site)}")
    kinds = where_kinds(where, info, site)

    def hook(resid: Tensor, fwd: Forward) -> Tensor:
        mask = where_mask(where, kinds, fwd).to(resid.device)
        added = vector if not per_kind else steering_vector(target, latents, strength=strength,
                                                            relative_to=relative_to, kinds=fwd.kinds)
        return resid + mask[..., None].to(resid.dtype) * added.to(resid.device, resid.dtype)

    with attach(model, {(layer, site): hook}, special_ids=special_ids):
        yield vector


class LatentStats(NamedTuple):
    """Per-latent statistics over a dataset, each ``(d_sae,)``."""

    mean: Tensor
    """Mean activation over all selected tokens (what mean-ablation sets a latent to)."""
    mean_firing: Tensor
    """Mean activation over the tokens where the latent fires (its typical strength; 0 if it never does)."""
    density: Tensor
    """Fraction of selected tokens where the latent fires."""


@torch.no_grad()
def latent_stats(model: Model, layer: int, sae: SAE, data: Iterable[dict], *, where: Where = None,
                 site: str = "resid_post", special_ids: Iterable[int] | None = None) -> LatentStats:
    """Mean, mean-when-firing and firing density of every latent over ``data`` (batches of model inputs).

    Each field is ``(d_sae,)`` float64 on the SAE's device, in latent activation units (density: a fraction).
    ``special_ids`` as in :func:`splice`.

    Raises:
        LayerIndexError: ``layer`` is outside the site's layers (``0..n_layers - 1`` in the decoder).
        SiteError: ``site`` is not a site of the model (``vlmsae.layers(model).sites``).
        ConfigError: the SAE's ``d_in`` is not the site's width (``d_model`` at the decoder), or ``where`` selects no token.
        UnsupportedModelError: the model is not a supported family.
    """
    info, layer, site = check_entry(model, layer, site, sae)
    kinds = where_kinds(where, info, site)
    d_sae = sae.cfg.d_sae
    total = torch.zeros(d_sae, dtype=torch.float64, device=sae.W_dec.device)
    fired = torch.zeros_like(total)
    tokens = torch.zeros((), dtype=torch.float64, device=total.device)
    for batch in tqdm(data, desc="latent stats", leave=False):
        with record(model, [layer], site=site, stop=True, special_ids=special_ids) as rec:
            model(**batch)
        mask = where_mask(where, kinds, rec.forwards[0]).to(total.device)
        latents = sae.encode(rec[layer].to(total.device), rec.kinds(layer))[mask].to(torch.float64)
        total += latents.sum(0)
        fired += (latents != 0).sum(0)
        tokens += latents.shape[0]
    if tokens == 0:
        raise ConfigError(f"where={where!r} selected no token in the data; check the data or where")
    return LatentStats(total / tokens, total / fired.clamp_min(1), fired / tokens)
