"""``vlmsae.evaluate``: what an SAE costs the language model when it replaces the residual stream.

Per batch: one clean pass (logits and the residual at the layer), then for each choice of spliced
positions one spliced pass, one zero-ablated and one mean-ablated pass. Cross-entropy is read on
the positions that predict a text token (for LLaVA and Qwen also when only image positions are
spliced: the question is what the image part of the residual carries for the text).

    loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)
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
from .checks import check_entry
from .errors import ConfigError, HookNameWarning
from .hooks import attach
from .interventions import splice
from .metrics import SpliceStats, kind_stats
from .positions import where_kinds, where_mask
from .record import record
from .sae import SAE


def loss_positions(kinds: Tensor) -> Tensor:
    """``(batch, seq - 1)`` bool: positions whose next token is text (or generated) and that are not pad."""
    target = kinds[:, 1:]
    return ((target == Kind.TEXT) | (target == Kind.GENERATED)) & (kinds[:, :-1] != Kind.PAD)


def token_losses(logits: Tensor, ids: Tensor) -> Tensor:
    """``(batch, seq - 1)`` next-token cross-entropy in nats, float32; ``logits`` ``(batch, seq, vocab)``."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")


def token_kl(clean: Tensor, other: Tensor) -> Tensor:
    """``(batch, seq - 1)`` KL(clean || other) of the next-token distributions, in nats, float32."""
    p = clean[:, :-1].float().log_softmax(-1)
    q = other[:, :-1].float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


@torch.no_grad()
def evaluate(model: Model, layer: int, sae: SAE, data: Iterable[dict], *, where: str | Iterable[str] | None = None,
             site: str = "resid_post", ablations: bool = True, special_ids: Iterable[int] | None = None,
             ) -> pd.DataFrame:
    """Cross-entropy clean / spliced / zero- and mean-ablated, loss recovered, KL, FVU and L0.

    One row per choice of spliced positions: ``where`` is a list of kind names (default: ``all``,
    plus ``image`` and ``text`` for families with image tokens). The mean ablation replaces the
    residual at the spliced positions by its mean over those positions in the same batch.
    Cross-entropy and KL are in nats per predicted token, averaged over the non-pad positions whose
    next token is text or generated (whatever is spliced; ``loss_tokens`` counts them); ``loss_recovered`` is
    ``(ce_zero - ce_spliced) / (ce_zero - ce_clean)`` (SAELens / SAEBench); FVU and L0 are over the
    spliced positions, overall and per token kind. ``special_ids`` are token ids counted as SPECIAL besides the
    config's (a chat template's control tokens: :func:`vlmsae.special_token_ids` with the tokenizer): they are
    not spliced as text, nor scored as next tokens.

    Raises:
        LayerIndexError: ``layer`` is outside ``0..n_layers - 1``.
        SiteError: ``site`` is not one of ``vlmsae.SITES``.
        ConfigError: the SAE's ``d_in`` is not the model's ``d_model``, a ``where`` selects no token, or
            ``data`` yields no batch.
        UnsupportedModelError: the model is not a supported family.
    """
    info, layer, site = check_entry(model, layer, site, sae)
    if where is None:
        where = ["all", "image", "text"] if info.has_image_tokens else ["all"]
    where = [where] if isinstance(where, str) else list(where)
    kinds_of = {w: where_kinds(w, info) for w in where}
    sums = {w: {k: 0.0 for k in ("clean", "spliced", "zero", "mean", "kl", "tokens")} for w in where}
    splices = {}
    with warnings.catch_warnings():  # check_sae has warned once if this is not the SAE's own site
        warnings.simplefilter("ignore", HookNameWarning)
        for batch in tqdm(data, desc="evaluate", leave=False):
            with record(model, [layer], site=site, special_ids=special_ids) as rec:
                clean = model(**batch).logits
            # On a model spread over devices the logits, the inputs and the layer may each be on another.
            ids = batch[info.ids_key].to(clean.device)
            resid, fwd = rec[layer], rec.forwards[0]
            positions = loss_positions(rec.kinds(layer)).to(clean.device)
            ce_clean = token_losses(clean, ids)
            for w in where:
                mask = where_mask(w, kinds_of[w], fwd).to(resid.device)
                s = sums[w]
                s["tokens"] += positions.sum()
                s["clean"] += ce_clean[positions].sum()
                with splice(model, layer, sae, where=w, site=site, special_ids=special_ids) as spliced:
                    logits = model(**batch).logits
                prev = splices.get(w)
                splices[w] = spliced.sums if prev is None else SpliceStats(*(a + b for a, b in zip(prev, spliced.sums)))
                s["spliced"] += token_losses(logits, ids)[positions].sum()
                s["kl"] += token_kl(clean, logits)[positions].sum()
                if ablations:
                    mean = resid[mask].mean(0) if mask.any() else torch.zeros_like(resid[0, 0])
                    for name, value in (("zero", torch.zeros_like(mean)), ("mean", mean)):
                        def replace(r, f, value=value, mask=mask):
                            return torch.where(mask[..., None].to(r.device), value.to(r), r)
                        with attach(model, {(layer, site): replace}, special_ids=special_ids):
                            s[name] += token_losses(model(**batch).logits, ids)[positions].sum()
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
            row |= {f"fvu{suffix}": values["fvu"], f"l0{suffix}": values["l0"],
                    f"spliced_tokens{suffix}": int(values["tokens"])}
        rows[w] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "spliced"
    return table

