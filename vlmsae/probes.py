"""Linear probes: is a concept linearly readable from SAE latents, and from the raw residual?

A probe is multinomial logistic regression on standardised inputs with an L2 penalty, fitted
full-batch with L-BFGS in torch. Accuracy is measured on held-out rows; ``chance`` is the
held-out share of the commonest class, the score of a probe that reads nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import pandas as pd
import torch
from torch import Tensor

from .errors import ConfigError


@dataclass
class Probe:
    """A fitted probe: ``logits = ((x - mean) / std) @ weight + bias``."""

    weight: Tensor
    """``(d, n_classes)``."""
    bias: Tensor
    """``(n_classes,)``."""
    mean: Tensor
    """``(d,)`` per-input mean of the training rows."""
    std: Tensor
    """``(d,)`` per-input standard deviation of the training rows (1 where constant)."""

    def logits(self, x: Tensor) -> Tensor:
        """``(n, d)`` -> ``(n, n_classes)``."""
        return ((x.float() - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x: Tensor) -> Tensor:
        """``(n, d)`` -> ``(n,)`` class index."""
        return self.logits(x).argmax(-1)


class ProbeAccuracy(NamedTuple):
    """How well a probe reads a concept."""

    train: float
    """Accuracy on the rows it was fitted on."""
    test: float
    """Accuracy on held-out rows."""
    chance: float
    """Held-out share of the commonest class."""


def class_indices(labels: Tensor | Sequence) -> Tensor:
    """``(n,)`` long class index of each label; labels may be a tensor or any sequence (e.g. strings)."""
    if isinstance(labels, Tensor):
        if labels.dtype.is_floating_point:
            raise ConfigError("probe labels must be classes (ints, bools or strings), not floats")
        return torch.unique(labels.reshape(-1).cpu(), return_inverse=True)[1]
    codes, _ = pd.factorize(pd.Series(list(labels)), sort=True)
    return torch.from_numpy(codes).long()


def fit_probe(x: Tensor, y: Tensor, *, l2: float = 1e-3, steps: int = 100) -> Probe:
    """Fit a probe to rows ``x`` ``(n, d)`` and class indices ``y`` ``(n,)``: multinomial logistic regression on
    standardised inputs with an ``l2`` penalty, by L-BFGS (``steps`` iterations at most), on the CPU.

    Raises:
        ConfigError: ``x`` and ``y`` do not have the same number of rows.
    """
    x = x.float().reshape(x.shape[0], -1).cpu()
    y = y.long().reshape(-1).cpu()
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"{x.shape[0]} rows of x but {y.shape[0]} labels; give one label per row")
    n_classes = int(y.max()) + 1
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a constant input (a dead latent) carries nothing
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(z @ weight + bias, y) + l2 * weight.pow(2).sum()
        value.backward()
        return value

    opt.step(loss)
    return Probe(weight.detach(), bias.detach(), mean, std)


def probe_accuracy(x: Tensor, labels: Tensor | Sequence, *, train_fraction: float = 0.7, seed: int = 0,
                   l2: float = 1e-3) -> ProbeAccuracy:
    """Fit a probe on a random ``train_fraction`` of the rows ``x`` ``(n, d)`` and score it on the rest.

    ``labels`` ``(n,)`` are class indices or any hashable labels. Accuracies are fractions of rows;
    ``chance`` is the held-out share of the commonest class.

    Raises:
        ConfigError: ``train_fraction`` outside (0, 1), or too few rows for a train and a test split.
    """
    if not 0 < train_fraction < 1:
        raise ConfigError(f"train_fraction={train_fraction} must be in (0, 1)")
    y = class_indices(labels)
    n = y.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = int(round(train_fraction * n))
    if not 0 < cut < n:
        raise ConfigError(f"{n} rows leave no train or no test rows at train_fraction={train_fraction}")
    train, test = order[:cut], order[cut:]
    x = x.float().reshape(n, -1).cpu()
    probe = fit_probe(x[train], y[train], l2=l2)
    accuracy = lambda rows: float((probe.predict(x[rows]) == y[rows]).float().mean())  # noqa: E731
    chance = float(torch.bincount(y[test]).max()) / len(test)
    return ProbeAccuracy(accuracy(train), accuracy(test), chance)


def compare_probes(inputs: Mapping[str, Tensor], labels: Mapping[str, Tensor | Sequence], **options) -> pd.DataFrame:
    """Held-out probe accuracy of each concept (rows) from each input (columns, e.g. latents vs residual).

    ``inputs``: name -> ``(n, d)`` rows, e.g. ``{"sae": latents, "resid": resid}``; ``labels``:
    concept -> ``(n,)`` classes of the same rows. ``options`` go to :func:`probe_accuracy`.
    Every input of one concept is scored on the same split; the ``chance`` column is that split's.

    Raises:
        ConfigError: an input and a concept's labels differ in rows, or what :func:`probe_accuracy` raises.
    """
    rows = {}
    for concept, y in labels.items():
        row = {}
        for name, x in inputs.items():
            if x.shape[0] != len(y):
                raise ConfigError(f"inputs[{name!r}] has {x.shape[0]} rows but labels[{concept!r}] has {len(y)}")
            result = probe_accuracy(x, y, **options)
            row[name] = result.test
        rows[concept] = row | {"chance": result.chance}  # the split is the same for every input
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "concept"
    return table
