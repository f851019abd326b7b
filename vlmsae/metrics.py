"""Reconstruction, sparsity and detection metrics, defined once and used everywhere.

The training metrics (`squared_error` to `dense_fraction`) return a 0-dim tensor on the input's
device (no host synchronisation), so a training loop can accumulate them and read them out every
N steps. Inputs are `(..., d_in)` activations / reconstructions and `(..., d_sae)` latents;
leading dimensions are flattened into tokens. `kind_stats` reads the per-token-kind sums a
splice keeps into a table; `auroc` scores latents as detectors of a labelled set.
"""

from typing import NamedTuple

import pandas as pd
import torch
from torch import Tensor

from .adapters import Kind
from .errors import ConfigError


def squared_error(x: Tensor, recon: Tensor) -> Tensor:
    """Sum over tokens and dimensions of (x - recon)^2, in float32 or wider."""
    return (x.float() - recon.float()).pow(2).sum()


def total_variance(x: Tensor) -> Tensor:
    """Sum over tokens of ||x - mean_tokens(x)||^2: the FVU denominator."""
    x = x.float().reshape(-1, x.shape[-1])
    return (x - x.mean(0)).pow(2).sum()


def mse(x: Tensor, recon: Tensor) -> Tensor:
    """Mean squared error per element: mean over tokens and dimensions of (x - recon)^2."""
    return squared_error(x, recon) / x.numel()


def fvu(x: Tensor, recon: Tensor) -> Tensor:
    """Fraction of variance unexplained: squared error / variance of x around its batch mean.

    0 is a perfect reconstruction, 1 is no better than predicting the mean
    (Gao et al. 2024 call this the normalized MSE). Over several batches,
    sum `squared_error` and `total_variance` separately and divide once.
    """
    return squared_error(x, recon) / total_variance(x)


def l0(latents: Tensor) -> Tensor:
    """Mean number of non-zero latents per token."""
    return (latents != 0).sum(-1).float().mean()


def dead_fraction(tokens_since_fired: Tensor, window: int) -> Tensor:
    """Fraction of latents that have not fired in the last `window` tokens.

    `tokens_since_fired` is `(d_sae,)`; Gao et al. 2024 (§A.2) count a latent
    as dead after 10M tokens without firing.
    """
    return (tokens_since_fired >= window).float().mean()


def token_count(n: int) -> str:
    """``n`` tokens, short: ``950``, ``12k``, ``1.5M``."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else str(n)


def dense_fraction(fire_count: Tensor, n_tokens: int | Tensor, threshold: float = 0.1) -> Tensor:
    """Fraction of latents that fire on more than `threshold` of `n_tokens` tokens.

    `fire_count` is `(d_sae,)`. Latents active on over 10% of tokens are the
    usual sign of an SAE that is not sparse where it should be.
    """
    return (fire_count > threshold * n_tokens).float().mean()


class SpliceStats(NamedTuple):
    """Running sums per token kind that a splice keeps (:attr:`vlmsae.Splice.sums`), on the device;
    :func:`kind_stats` turns them into a table."""

    tokens: Tensor  # (n_kinds,)
    squared_error: Tensor  # (n_kinds,)
    sum_x: Tensor  # (n_kinds, d_in)
    sum_sq_x: Tensor  # (n_kinds,)
    l0: Tensor  # (n_kinds,) sum of per-token L0
    fired: Tensor  # (n_kinds, d_sae) tokens of each kind where each latent fired


def kind_stats(s: SpliceStats) -> pd.DataFrame:
    """FVU, L0, dead fraction and token count per token kind present in the sums, plus ``all``.

    The sums add across batches, so FVU over many batches is measured around their joint mean. ``dead``: the
    fraction of latents that fired on none of the row's ``tokens`` (the one definition of dead, over that window).
    ``fvu`` is NaN for a kind whose residuals are all alike (BOS at position 0): it has no variance to explain.
    """
    rows = {}
    groups = [("all", list(Kind))] + [(k.name.lower(), [k]) for k in Kind]
    for name, kinds in groups:
        idx = torch.tensor([int(k) for k in kinds])
        n = s.tokens[idx].sum()
        if n == 0:
            continue
        sum_x = s.sum_x[idx].sum(0)
        variance = s.sum_sq_x[idx].sum() - sum_x.pow(2).sum() / n  # sum ||x - mean||^2
        # A kind whose residuals are all alike (BOS at position 0) has no variance to explain: FVU is undefined.
        flat = variance <= 1e-9 * s.sum_sq_x[idx].sum()
        rows[name] = {"fvu": float("nan") if flat else (s.squared_error[idx].sum() / variance).item(),
                      "l0": (s.l0[idx].sum() / n).item(),
                      "dead": (s.fired[idx].sum(0) == 0).double().mean().item(), "tokens": int(n.item())}
    return pd.DataFrame.from_dict(rows, orient="index")


def auroc(pos: Tensor, neg: Tensor) -> Tensor:
    """``(columns,)`` AUROC of each column at ranking ``pos`` rows above ``neg`` rows, ties counting half.

    ``pos`` is ``(n_pos, columns)``, ``neg`` is ``(n_neg, columns)``: the Mann-Whitney statistic
    ``P(pos > neg) + P(pos == neg) / 2``, computed with sorted negatives and binary search.
    """
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise ConfigError(f"AUROC needs positives and negatives; got {pos.shape[0]} and {neg.shape[0]}")
    neg_sorted = neg.T.contiguous().float().sort(dim=1).values  # (columns, n_neg)
    queries = pos.T.contiguous().float()  # (columns, n_pos)
    below = torch.searchsorted(neg_sorted, queries, right=False).float()
    not_above = torch.searchsorted(neg_sorted, queries, right=True).float()
    return ((below + not_above) / 2).mean(1) / neg.shape[0]
