"""Reconstruction and sparsity metrics, defined once and used everywhere.

Every function returns a 0-dim tensor on the input's device (no host
synchronisation), so a training loop can accumulate them and read them out
every N steps. Inputs are `(..., d_in)` activations / reconstructions and
`(..., d_sae)` latents; leading dimensions are flattened into tokens.
"""

from torch import Tensor


def squared_error(x: Tensor, recon: Tensor) -> Tensor:
    """Sum over tokens and features of (x - recon)^2, in float32 or wider."""
    return (x.float() - recon.float()).pow(2).sum()


def total_variance(x: Tensor) -> Tensor:
    """Sum over tokens of ||x - mean_tokens(x)||^2: the FVU denominator."""
    x = x.float().reshape(-1, x.shape[-1])
    return (x - x.mean(0)).pow(2).sum()


def mse(x: Tensor, recon: Tensor) -> Tensor:
    """Mean squared error per element: mean over tokens and features of (x - recon)^2."""
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


def dense_fraction(fire_count: Tensor, n_tokens: int | Tensor, threshold: float = 0.1) -> Tensor:
    """Fraction of latents that fire on more than `threshold` of `n_tokens` tokens.

    `fire_count` is `(d_sae,)`. Latents active on over 10% of tokens are the
    usual sign of an SAE that is not sparse where it should be.
    """
    return (fire_count > threshold * n_tokens).float().mean()
