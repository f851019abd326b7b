"""Shared fixtures: one tiny model per zoo family, and a check that a model carries no leftover hooks."""

import functools

import pytest
import torch

from vlmsae.zoo import FAMILIES, tiny_inputs, tiny_model


@functools.cache
def _model(family: str):
    model = tiny_model(family)
    # transformers installs its own output-capturing hooks on first use; let it, before any snapshot.
    with torch.no_grad():
        model(**tiny_inputs(model, 1), output_hidden_states=True)
    return model


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    """A tiny model of each family, shared across tests (tests must leave it unhooked and unchanged)."""
    m = _model(family)
    before = hook_snapshot(m)
    yield m
    assert hook_snapshot(m) == before, "a test left hooks on the shared model"


def hook_snapshot(model: torch.nn.Module) -> dict:
    """Every hook registered on every submodule (transformers installs some of its own, which stay)."""
    snap = {}
    for name, module in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_forward_hooks_always_called"):
            d = getattr(module, attr, None)
            if d:
                snap[(name, attr)] = tuple(d.keys())
        for attr in ("forward", "generate"):  # vlmsae wraps these on the instance inside a context
            if attr in module.__dict__:
                snap[(name, attr)] = module.__dict__[attr]
    return snap


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def topk_by_hand(sae, x):
    """The TopK SAE written out (Gao et al. 2024): (reconstruction, latents) of x (..., d_in)."""
    W_enc, b_enc, W_dec, b_dec = (t.detach() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    scale = sae.act_scale.detach()
    pre = (x * scale - b_dec) @ W_enc + b_enc
    top = pre.topk(sae.cfg.k, dim=-1)
    latents = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return (latents @ W_dec + b_dec) / scale, latents


def assert_step_equals_dense_step(sae, reference, loss) -> None:
    """`sae` after one trainer step (lr 1e-3) against `reference` (the same SAE before it) after the step written
    out from the definitions: `loss` backpropagated, the gradient parallel to the decoder rows removed, one Adam step
    (Gao et al.'s eps), the decoder rows renormalised; every parameter compared."""
    loss.backward()
    reference.remove_parallel_decoder_grad_()
    torch.optim.Adam(reference.parameters(), lr=1e-3, eps=6.25e-10).step()
    reference.normalize_decoder_()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(getattr(sae, name), p, rtol=1e-9, atol=1e-12, msg=name)
