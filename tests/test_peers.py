"""Cross-checks against peer libraries (issue 2): vlmsae must agree with nnsight 0.8 and with
TransformerLens 4's ``TransformerBridge`` on the same model object, never only with itself.

Each peer is imported inside its fixture, so a missing peer skips only its own tests.
Every model here is built for this module alone: nnsight installs its controller on every
submodule and the bridge swaps the decoder layers in place, so neither may touch the shared
conftest models.
"""

from __future__ import annotations

import os
import socket
import subprocess
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

import vlmsae
from vlmsae.zoo import BOS, EOS, FAMILIES, FIRST_TEXT_ID, IMAGE, PAD, tiny_inputs, tiny_model

ATOL_LOGITS = 1e-5
ATOL_RESID = 1e-6
NEW_TOKENS = 4


def _steering_vector(d_model: int) -> torch.Tensor:
    return torch.randn(d_model, generator=torch.Generator().manual_seed(1234))


def _plus(output, v: torch.Tensor):
    """A decoder layer's output with ``v`` added to its residual (a tensor in transformers 5, a tuple before)."""
    if isinstance(output, tuple):
        return (output[0] + v, *output[1:])
    return output + v


def _resid(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


# --------------------------------------------------------------------------- nnsight 0.8


@pytest.fixture(scope="module", params=FAMILIES)
def traced(request):
    """A tiny model of each family, its nnsight wrapper, and the nnsight envoys of its decoder layers."""
    nnsight = pytest.importorskip("nnsight")
    model = tiny_model(request.param)
    wrapped = nnsight.NNsight(model)
    info = vlmsae.layers(wrapped)
    assert info.model is model, "vlmsae.layers(NNsight(model)) must unwrap to the model itself"
    envoy = wrapped
    for part in info.layer_path.split("."):  # the same path, walked through nnsight's module tree
        envoy = getattr(envoy, part)
    return SimpleNamespace(
        nnsight=nnsight, family=request.param, model=model, wrapped=wrapped, info=info, envoys=envoy,
        layer=info.n_layers // 2, v=_steering_vector(info.d_model),
    )


def test_nnsight_edit_matches_attach(traced):
    """Adding v at resid_post of a middle layer: vlmsae.attach and an nnsight trace give the same logits."""
    t = traced
    inputs = tiny_inputs(t.model, 2)
    layer = t.envoys[t.layer]
    with torch.no_grad():
        clean = t.model(**inputs).logits
        with vlmsae.attach(t.model, {(t.layer, "resid_post"): lambda resid, fwd: resid + t.v}):
            ours = t.model(**inputs).logits
        with t.wrapped.trace(**inputs):
            layer.output = _plus(layer.output, t.v)
            theirs = t.wrapped.output.logits.save()
    assert (ours - clean).abs().max() > 1e-2, f"{t.family}: adding v at layer {t.layer} did not change the logits"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL_LOGITS)


def test_record_on_nnsight_object_matches_output_save(traced):
    """vlmsae.record on the NNsight wrapper, open around an nnsight trace, sees what nnsight saves, at every layer."""
    t = traced
    inputs = tiny_inputs(t.model, 2, padding="left")
    n = t.info.n_layers
    with torch.no_grad(), vlmsae.record(t.wrapped, layers=range(n)) as rec:
        with t.wrapped.trace(**inputs):
            saved = t.nnsight.save([t.envoys[i].output for i in range(n)])
    for i in range(n):
        torch.testing.assert_close(rec[i], _resid(saved[i]), rtol=0, atol=ATOL_RESID, msg=f"{t.family} layer {i}")


def test_nnsight_generate_edit_matches_attach(traced):
    """The same edit at every decode step of greedy generate(): per-step logits and tokens agree with nnsight."""
    t = traced
    inputs = tiny_inputs(t.model, 2, padding="left")
    gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
               return_dict_in_generate=True)
    layer = t.envoys[t.layer]
    with torch.no_grad():
        clean = t.model.generate(**inputs, **gen)
        with vlmsae.attach(t.model, {(t.layer, "resid_post"): lambda resid, fwd: resid + t.v}):
            ours = t.model.generate(**inputs, **gen)
        with t.wrapped.trace(**inputs, **gen, fn=t.model.generate) as tracer:
            # Bounded: code after an open-ended tracer.iter[:] never runs (DESIGN.md). The model runs
            # NEW_TOKENS forwards: the prompt, then each generated token but the last fed back in.
            for _ in tracer.iter[0:NEW_TOKENS]:
                layer.output = _plus(layer.output, t.v)
            theirs = tracer.result.save()
    assert len(ours.logits) == len(theirs.logits) == NEW_TOKENS
    assert any((a - b).abs().max() > 1e-2 for a, b in zip(ours.logits, clean.logits)), \
        f"{t.family}: the edit did not change the generate() logits"
    for step, (a, b) in enumerate(zip(ours.logits, theirs.logits)):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL_LOGITS, msg=f"{t.family} decode step {step}")
    torch.testing.assert_close(ours.sequences, theirs.sequences, rtol=0, atol=0)


# --------------------------------------------------------------------------- TransformerLens bridge


@contextmanager
def _sealed(attempts: list, helpers):
    """No network, no subprocess, and no on-the-fly ``pip install torchvision`` while the bridge boots.

    ``boot_transformers`` loads an ``AutoProcessor`` for every multimodal model and, when that
    fails, calls ``helpers._ensure_torchvision``, which pip-installs torchvision (DESIGN.md:
    never let it). Its stand-in answers "not importable"; every other escape is refused and logged.
    """
    def refuse(what):
        def call(*args, **kwargs):
            attempts.append((what, args))
            raise OSError(f"test_peers: {what} is not allowed while booting a TransformerBridge")
        return call

    def no_torchvision():
        attempts.append(("_ensure_torchvision", ()))
        return False

    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
        mp.setattr(helpers, "_ensure_torchvision", no_torchvision)
        mp.setattr(subprocess, "Popen", refuse("subprocess"))  # run/call/check_call all go through Popen
        mp.setattr(os, "system", refuse("os.system"))
        mp.setattr(socket.socket, "connect", refuse("network"))
        mp.setattr(socket.socket, "connect_ex", refuse("network"))
        mp.setattr(socket, "getaddrinfo", refuse("network"))
        yield


def _offline_tokenizer(vocab_size: int):
    """A WordLevel tokenizer over the zoo's id layout, built with no hub access.

    ``add_bos_token`` and ``name_or_path`` are set because the bridge otherwise reloads the
    tokenizer by name from the hub to turn BOS on (``get_tokenizer_with_bos``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<image>": IMAGE}
    vocab.update({f"t{i}": i for i in range(FIRST_TEXT_ID, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", add_bos_token=True, name_or_path="vlmsae-zoo-offline")


@pytest.fixture(scope="module")
def bridged():
    """A tiny LLaVA, its residuals and logits before any bridge, then a TransformerBridge booted around it."""
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources.transformers import helpers

    model = tiny_model("llava")
    inputs = tiny_inputs(model, 2)
    info = vlmsae.layers(model)
    with torch.no_grad(), vlmsae.record(model, layers=range(info.n_layers)) as rec:
        logits = model(**inputs).logits
    before = {i: rec[i] for i in range(info.n_layers)}

    attempts = []
    with _sealed(attempts, helpers):
        # boot_transformers wraps the object it is given (hf_model=) in place; a model built from a
        # config object has no config.architectures, so the bridge is told which adapter to use.
        bridge = TransformerBridge.boot_transformers(
            "vlmsae-zoo/tiny-llava", hf_model=model, tokenizer=_offline_tokenizer(model.config.get_text_config().vocab_size),
            device="cpu", hf_config_overrides={"architectures": ["LlavaForConditionalGeneration"]},
        )
    return SimpleNamespace(model=model, inputs=inputs, info=info, bridge=bridge, attempts=attempts,
                           logits_before=logits, resid_before=before)


def test_bridge_boot_is_offline_and_installs_nothing(bridged):
    escapes = [a for a in bridged.attempts if a[0] != "_ensure_torchvision"]
    assert not escapes, f"booting the bridge tried to leave the process: {escapes}"


def test_bridge_cache_matches_record_at_every_layer(bridged):
    """run_with_cache's blocks.L.hook_resid_post equals vlmsae.record on the same object, at every layer."""
    b = bridged
    inputs = b.inputs
    n = b.info.n_layers
    with torch.no_grad(), vlmsae.record(b.model, layers=range(n)) as rec:
        logits, cache = b.bridge.run_with_cache(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                                pixel_values=inputs["pixel_values"])
    assert vlmsae.layers(b.model).n_layers == n
    torch.testing.assert_close(logits, b.logits_before, rtol=0, atol=ATOL_LOGITS)
    for i in range(n):
        name = b.info.hook_name(i)
        assert name == f"blocks.{i}.hook_resid_post"
        theirs = cache[name]
        # vlmsae's hook and the bridge's hook point fire in the same forward ...
        torch.testing.assert_close(rec[i], theirs, rtol=0, atol=ATOL_RESID, msg=f"layer {i}, same forward")
        # ... and agree with vlmsae on the model before the bridge swapped its layers (sdpa, not eager).
        torch.testing.assert_close(b.resid_before[i], theirs, rtol=0, atol=ATOL_RESID, msg=f"layer {i}, unbridged")


def test_bridge_hook_edit_matches_attach(bridged):
    """Adding v through the bridge's hook point and through vlmsae.attach gives the same logits."""
    b = bridged
    inputs = b.inputs
    layer = b.info.n_layers // 2
    v = _steering_vector(b.info.d_model)
    with torch.no_grad():
        with vlmsae.attach(b.model, {(layer, "resid_post"): lambda resid, fwd: resid + v}):
            ours = b.model(**inputs).logits
        theirs = b.bridge.run_with_hooks(
            inputs["input_ids"], fwd_hooks=[(b.info.hook_name(layer), lambda resid, hook: resid + v)],
            attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"])
    assert (ours - b.logits_before).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL_LOGITS)
