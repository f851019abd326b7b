"""``vlmsae.evaluate``: what an SAE costs the language model when it replaces the residual stream.

Per batch: one clean pass (logits and the residual at the layer), then for each choice of spliced
positions one spliced pass, one zero-ablated and one mean-ablated pass. Cross-entropy is read on
the positions that predict a text token (for LLaVA and Qwen also when only image positions are
spliced: the question is what the image part of the residual carries for the text).

    loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)

A transcoder is evaluated where it writes: its prediction replaces the MLP's output, and the ablations zero it or
set it to its mean (so ``ce_zero`` is the loss without the layer's MLP).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .adapters import Kind, Model
from .checks import check_entry, output_site
from .errors import ConfigError, HookNameWarning, SiteError
from .hooks import attach
from .interventions import splice
from .metrics import SpliceStats, kind_stats
from .positions import where_kinds, where_mask
from .record import record
from .sae import SAE
from .sites import stream_of


def loss_positions(kinds: Tensor) -> Tensor:
    """``(batch, seq - 1)`` bool: positions whose next token is text (or generated) and that are not pad."""
    target = kinds[:, 1:]
    return ((target == Kind.TEXT) | (target == Kind.GENERATED)) & (kinds[:, :-1] != Kind.PAD)


CHUNK_ROWS = 1024
"""Rows of logits taken to float32 at a time: at a 152k vocabulary 0.6 GB per tensor, whatever the batch."""


def predicting(logits: Tensor, positions: Tensor) -> Tensor:
    """``(n, vocab)``: the rows of ``logits`` ``(batch, seq, vocab)`` at ``positions`` ``(batch, seq - 1)`` (each
    predicts the next token), in the model's dtype; the rest of the logits can then be freed."""
    return logits[:, :-1][positions]


def _chunked(fn, *rows: Tensor) -> Tensor:
    """``fn`` on ``CHUNK_ROWS`` rows at a time, concatenated: ``(n,)`` float32."""
    n = rows[0].shape[0]
    parts = [fn(*(r[i:i + CHUNK_ROWS] for r in rows)) for i in range(0, n, CHUNK_ROWS)]
    return torch.cat(parts) if parts else torch.zeros(0, device=rows[0].device)


def row_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """``(n,)`` cross-entropy in nats, float32, of ``logits`` ``(n, vocab)`` against the token ids ``targets`` ``(n,)``."""
    return _chunked(lambda x, t: F.cross_entropy(x.float(), t, reduction="none"), logits, targets)


def row_kl(clean: Tensor, other: Tensor) -> Tensor:
    """``(n,)`` KL(clean || other) of the next-token distributions of two ``(n, vocab)`` logit rows, in nats, float32."""
    def kl(a: Tensor, b: Tensor) -> Tensor:
        p, q = a.float().log_softmax(-1), b.float().log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1)
    return _chunked(kl, clean, other)


@torch.no_grad()
def evaluate(model: Model, layer: int | str | None, sae: SAE, data: Iterable[dict], *,
             where: str | Iterable[str] | None = None, site: str = "resid_post", ablations: bool = True,
             special_ids: Iterable[int] | None = None) -> pd.DataFrame:
    """Cross-entropy clean / spliced / zero- and mean-ablated, loss recovered, KL, FVU and L0.

    One row per choice of spliced positions: ``where`` is a list of kind names (default: ``all``,
    plus ``image`` and ``text`` for families with image tokens). The mean ablation replaces the
    residual at the spliced positions by its mean over those positions in the same batch.
    Cross-entropy and KL are in nats per predicted token, averaged over the non-pad positions whose
    next token is text or generated (whatever is spliced; ``loss_tokens`` counts them), computed only
    there and ``CHUNK_ROWS`` positions at a time (the float32 log-probabilities of a whole batch over a
    large vocabulary would be gigabytes); ``loss_recovered`` is
    ``(ce_zero - ce_spliced) / (ce_zero - ce_clean)`` (SAELens / SAEBench); FVU and L0 are over the
    spliced positions, overall and per token kind; so is ``dead``, the fraction of latents that fired on none of
    the ``spliced_tokens`` (of that kind). A kind whose residuals are all alike (SPECIAL when it is only BOS at
    position 0) has no variance to explain: its FVU is NaN. ``special_ids`` are token ids counted as SPECIAL besides the
    config's (a chat template's control tokens: :func:`vlmsae.special_token_ids` with the tokenizer): they are
    not spliced as text, nor scored as next tokens.

    ``layer=None`` evaluates the SAE where its metadata says (``hook_name``). A transcoder
    (:class:`vlmsae.Transcoder`, at ``mlp_in`` / ``mlp_out`` or where its metadata says) is spliced as
    :func:`vlmsae.splice` does, and its FVU is that of its prediction of the MLP's output; the zero and mean ablations
    replace the MLP's output.

    At a vision tower's site or the projector's output (``"vision.blocks.3.hook_resid_post"``) the loss is the
    decoder's all the same, read at the same positions; ``where`` then chooses patches (``"image"``, ``"special"``
    for a class token), by default all of them.

    Raises:
        LayerIndexError: ``layer`` is outside the site's layers.
        SiteError: ``site`` is not a site of the model, or the model has no decoder (a dual encoder).
        ConfigError: the SAE's ``d_in`` is not the model's ``d_model``, a ``where`` selects no token, or
            ``data`` yields no batch.
        UnsupportedModelError: the model is not a supported family.
    """
    info, layer, site = check_entry(model, layer, site, sae)
    out = output_site(sae, layer, site)  # where the SAE writes and the ablations act (a transcoder's: mlp_out)
    decoder = stream_of(site) == "decoder"
    if not info.n_layers:
        raise SiteError(f"evaluate() measures a decoder's next-token loss; this {info.family} model has no decoder "
                        "(a dual encoder): splice the SAE and read its logits_per_image instead")
    if where is None:
        where = ["all", "image", "text"] if info.has_image_tokens and decoder else ["all"]
    where = [where] if isinstance(where, str) else list(where)
    kinds_of = {w: where_kinds(w, info, site) for w in where}
    extra = frozenset(int(i) for i in (special_ids or ()))
    sums = {w: {k: 0.0 for k in ("clean", "spliced", "zero", "mean", "kl", "tokens")} for w in where}
    splices = {}
    with warnings.catch_warnings():  # check_sae has warned once if this is not the SAE's own site
        warnings.simplefilter("ignore", HookNameWarning)
        for batch in tqdm(data, desc="evaluate", leave=False):
            with record(model, [layer], site=out, special_ids=special_ids) as rec:
                logits = model(**batch).logits
            # On a model spread over devices the logits, the inputs and the layer may each be on another.
            # the decoder's kinds say where the loss is read, whichever site is spliced (a vision tower's too)
            kinds = rec.kinds(layer) if decoder else info.kinds(batch[info.ids_key], batch.get(info.mask_key), extra)
            positions = loss_positions(kinds).to(logits.device)
            targets = batch[info.ids_key].to(logits.device)[:, 1:][positions]
            clean = predicting(logits, positions)
            del logits
            resid, fwd = rec[layer], rec.forwards[0]
            ce_clean = row_losses(clean, targets).sum()
            for w in where:
                mask = where_mask(w, kinds_of[w], fwd).to(resid.device)
                s = sums[w]
                s["tokens"] += positions.sum()
                s["clean"] += ce_clean
                with splice(model, layer, sae, where=w, site=site, special_ids=special_ids) as spliced:
                    logits = predicting(model(**batch).logits, positions)
                prev = splices.get(w)
                splices[w] = spliced.sums if prev is None else SpliceStats(*(a + b for a, b in zip(prev, spliced.sums)))
                s["spliced"] += row_losses(logits, targets).sum()
                s["kl"] += row_kl(clean, logits).sum()
                if ablations:
                    mean = resid[mask].mean(0) if mask.any() else torch.zeros_like(resid[0, 0])
                    for name, value in (("zero", torch.zeros_like(mean)), ("mean", mean)):
                        def replace(r, f, value=value, mask=mask):
                            return torch.where(mask[..., None].to(r.device), value.to(r), r)
                        with attach(model, {(layer, out): replace}, special_ids=special_ids):
                            s[name] += row_losses(predicting(model(**batch).logits, positions), targets).sum()
    if not splices:
        raise ConfigError("evaluate() got no batches: data yielded nothing")
    rows = {}
    for w in where:
        s = {k: float(v) for k, v in sums[w].items()}
        n = max(s["tokens"], 1)
        ce = {k: s[k] / n for k in ("clean", "spliced", "zero", "mean")}
        stats = kind_stats(splices[w])
        row = {"ce_clean": ce["clean"], "ce_spliced": ce["spliced"]}
        if ablations:
            row |= {"ce_zero": ce["zero"], "ce_mean": ce["mean"],
                    "loss_recovered": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"])}
        row |= {"kl": s["kl"] / n, "loss_tokens": int(s["tokens"])}
        for kind, values in stats.iterrows():  # "all" first, then each kind that was spliced
            suffix = "" if kind == "all" else f"_{kind}"
            row |= {f"fvu{suffix}": values["fvu"], f"l0{suffix}": values["l0"], f"dead{suffix}": values["dead"],
                    f"spliced_tokens{suffix}": int(values["tokens"])}
        rows[w] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "spliced"
    return table

