"""Interventions on a model spread by accelerate (issue 13 item 6): splice, ablate, steer, evaluate,
latent_stats and scan give what they give on the same model undispatched, and ``vlmsae.place`` puts an
SAE on its layer's execution device.

The reference is the plain model (no accelerate hook) with the same weights and the same SAE. On a
CPU-only machine there is one real device, so the spreads here are the ones accelerate makes there:

- ``cpu_offload``: every weight on ``meta``, moved in by hooks on the modules that hold weights;
- ``disk_offload``: the same from a folder of safetensors files;
- ``device_map``: ``dispatch_model`` with the decoder layers alternately ``"cpu"`` (weights stay) and
  ``"disk"`` (weights on ``meta``), a hook with an execution device on each layer itself.

A CUDA + CPU split (layers 0-1 computed on the GPU, the rest on the CPU) runs where a GPU is present.
"""

import copy

import pandas as pd
import pytest
import torch

import vlmsae
from vlmsae import SAE
from vlmsae.hooks import execution_device
from vlmsae.zoo import tiny_inputs, tiny_model

accelerate = pytest.importorskip("accelerate")

LAYER = 1
MODES = ["cpu_offload", "disk_offload", "device_map"]
FAMILIES = ["llava", "vit-gpt2", "qwen2.5-vl"]


def make_sae(d_in=64, seed=0):
    torch.manual_seed(seed)
    return SAE(d_in=d_in, d_sae=256, k=8).eval()


def device_map(model, layer_devices) -> dict[str, object]:
    """A device map for ``dispatch_model``: decoder layer i on ``layer_devices(i)``, every other module on "cpu"."""
    info = vlmsae.layers(model)
    path = next(name for name, module in model.named_modules() if module is info.layers)
    found = {}

    def visit(module, prefix):
        for name, child in module.named_children():
            full = prefix + name
            if full == path:
                found.update({f"{full}.{i}": layer_devices(i) for i in range(len(info.layers))})
            elif path.startswith(full + "."):
                visit(child, full + ".")
            else:
                found[full] = "cpu"
    visit(model, "")
    return found


def spread(model, mode: str, folder):
    """A copy of ``model`` spread by accelerate as ``mode`` says."""
    model = copy.deepcopy(model)
    if mode == "cpu_offload":
        return accelerate.cpu_offload(model, execution_device="cpu")
    if mode == "disk_offload":
        return accelerate.disk_offload(model, str(folder), execution_device="cpu")
    return accelerate.dispatch_model(model, device_map(model, lambda i: "disk" if i % 2 else "cpu"),
                                     offload_dir=str(folder), main_device="cpu")


_CACHE = {}


@pytest.fixture(params=MODES)
def pair(request, tmp_path_factory):
    """``(plain, spread)`` llava models with the same weights, built once per mode."""
    return _pair("llava", request.param, tmp_path_factory)


def _pair(family, mode, tmp_path_factory):
    if (family, mode) not in _CACHE:
        plain = tiny_model(family)
        _CACHE[family, mode] = plain, spread(plain, mode, tmp_path_factory.mktemp(f"{family}-{mode}"))
    return _CACHE[family, mode]


def logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


@pytest.mark.parametrize("mode", MODES)
def test_the_spread_is_real_and_execution_device_sees_through_it(mode, tmp_path_factory):
    plain, model = _pair("llava", mode, tmp_path_factory)
    layers = vlmsae.layers(model).layers
    assert any(p.device.type == "meta" for layer in layers for p in layer.parameters())  # weights offloaded
    assert all(execution_device(layer) == torch.device("cpu") for layer in layers)
    inputs = tiny_inputs(plain, 2)
    assert torch.equal(logits(model, inputs), logits(plain, inputs))


def test_place_follows_accelerates_execution_device_not_the_weights():
    model = tiny_model("llava")
    layer = vlmsae.layers(model).layers[2]
    # A hook that says "meta" while the weights are on the CPU: place must read the hook.
    accelerate.hooks.add_hook_to_module(layer, accelerate.hooks.AlignDevicesHook(execution_device="meta"))
    try:
        sae = vlmsae.place(model, 2, make_sae())
        assert sae.W_dec.device.type == "meta"
        assert vlmsae.place(model, 1, make_sae()).W_dec.device == torch.device("cpu")  # no hook there: the weights
    finally:
        accelerate.hooks.remove_hook_from_module(layer)


def test_place_refuses_a_layer_with_no_device():
    model = tiny_model("llava")
    vlmsae.layers(model).layers[LAYER].to("meta")
    with pytest.raises(vlmsae.ConfigError, match="meta"):
        vlmsae.place(model, LAYER, make_sae())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_splice_and_ablate_give_the_plain_models_logits(family, mode, tmp_path_factory):
    plain, model = _pair(family, mode, tmp_path_factory)
    inputs = tiny_inputs(plain, 2)
    sae = vlmsae.place(model, LAYER, make_sae())
    for site in ("resid_post", "resid_pre"):
        with vlmsae.splice(plain, LAYER, sae, site=site) as ref:
            expected = logits(plain, inputs)
        with vlmsae.splice(model, LAYER, sae, site=site) as s:
            got = logits(model, inputs)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert s.latents.device == execution_device(vlmsae.layers(model).layers[LAYER])
        pd.testing.assert_frame_equal(s.stats(), ref.stats())
    chosen = (ref.latents != 0).sum((0, 1)).topk(2).indices.tolist()  # two latents that fire
    with vlmsae.ablate(plain, LAYER, sae, latents=chosen):
        expected = logits(plain, inputs)
    with vlmsae.ablate(model, LAYER, sae, latents=chosen):
        got = logits(model, inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(expected, logits(plain, inputs))  # the ablation did something
    assert torch.equal(logits(model, inputs), logits(plain, inputs))  # and left both models as they were


@pytest.mark.parametrize("family", ["llava", "vit-gpt2"])
@pytest.mark.parametrize("mode", MODES)
def test_steer_under_generate_with_the_kv_cache(family, mode, tmp_path_factory):
    plain, model = _pair(family, mode, tmp_path_factory)
    inputs = tiny_inputs(plain, 2, padding="left")
    sae = make_sae()
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    outs = {}
    for name, m in (("plain", plain), ("spread", model)):
        with vlmsae.steer(m, LAYER, sae, latents={3: 40.0, 7: -20.0}, where="generated"):
            outs[name] = m.generate(**inputs, **gen, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(outs["spread"].sequences, outs["plain"].sequences)
    for a, b in zip(outs["spread"].scores, outs["plain"].scores):  # every decode step's logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(outs["plain"].sequences, plain.generate(**inputs, **gen))  # steering changed it


@pytest.mark.parametrize("mode", MODES)
def test_evaluate_latent_stats_and_scan_match_and_leave_accelerates_forward(mode, tmp_path_factory):
    plain, model = _pair("llava", mode, tmp_path_factory)
    data = [tiny_inputs(plain, 2, seed=s) for s in range(2)]
    sae = make_sae()
    forward = model.__dict__.get("forward")  # accelerate's wrapper of the model's forward
    assert forward is not None
    pd.testing.assert_frame_equal(vlmsae.evaluate(model, LAYER, sae, data), vlmsae.evaluate(plain, LAYER, sae, data))
    for a, b in zip(vlmsae.latent_stats(model, LAYER, sae, data), vlmsae.latent_stats(plain, LAYER, sae, data)):
        assert torch.equal(a, b)
    got, expected = vlmsae.scan(model, LAYER, sae, data, n_examples=2), vlmsae.scan(plain, LAYER, sae, data, n_examples=2)
    assert got.tokens == expected.tokens and torch.equal(got.total, expected.total)
    assert torch.equal(got.top.values, expected.top.values) and torch.equal(got.top.heat, expected.top.heat)
    # latent_stats and scan stop the forward early (they patch forward): accelerate's must come back
    assert model.__dict__.get("forward") is forward
    assert torch.equal(logits(model, data[0]), logits(plain, data[0]))


def test_a_prefix_of_the_layers_is_enough_to_harvest(tmp_path):
    """docs/scaling.md: the layers after the deepest hooked one may stay on disk; they are never loaded."""
    plain = tiny_model("llava")
    dm = device_map(plain, lambda i: "cpu" if i <= LAYER else "disk")
    dm = {name: "disk" if name == "lm_head" else device for name, device in dm.items()}
    model = accelerate.dispatch_model(copy.deepcopy(plain), dm, offload_dir=str(tmp_path), main_device="cpu")
    inputs = tiny_inputs(plain, 2)
    with torch.no_grad(), vlmsae.record(model, [LAYER], stop=True) as got, vlmsae.record(plain, [LAYER]) as expected:
        assert model(**inputs) is None
        plain(**inputs)
    assert torch.equal(got[LAYER], expected[LAYER])
    assert all(p.device.type == "meta" for layer in vlmsae.layers(model).layers[LAYER + 1:] for p in layer.parameters())


TRAIN = {"steps": 12, "batch_size": 64, "buffer_size": 512, "sync_every": 4, "warmup_steps": 2, "k_start": None,
         "progress": False}


def train_two_layers(model, data):
    saes = {L: make_sae(seed=L).train() for L in (1, 3)}
    return vlmsae.train(model, [1, 3], data, saes, **TRAIN)


@pytest.mark.parametrize("mode", ["device_map", "disk_offload"])
def test_online_training_on_a_spread_model_equals_the_plain_model(mode, tmp_path_factory):
    """Training on a model accelerate spreads (layers on devices or offloaded): each SAE and its buffer on its
    layer's execution device, and the SAEs equal those trained on the plain model from the same data."""
    plain, model = _pair("llava", mode, tmp_path_factory)
    data = [tiny_inputs(plain, 4, seed=s) for s in range(6)]
    got, expected = train_two_layers(model, data).saes, train_two_layers(plain, data).saes
    layers = vlmsae.layers(model).layers
    for L in (1, 3):
        assert got[L][0].W_dec.device == execution_device(layers[L])
        for name, value in expected[L][0].state_dict().items():
            assert torch.equal(got[L][0].state_dict()[name], value), (L, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for a second device")
def test_cuda_and_cpu_split():
    plain = tiny_model("llava")
    model = accelerate.dispatch_model(copy.deepcopy(plain), device_map(plain, lambda i: 0 if i < 2 else "cpu"),
                                      main_device="cpu")
    layers = vlmsae.layers(model).layers
    assert [execution_device(layer).type for layer in layers] == ["cuda", "cuda", "cpu", "cpu"]
    inputs = tiny_inputs(plain, 2)
    for layer in (LAYER, 3):
        sae = vlmsae.place(model, layer, make_sae())
        assert sae.W_dec.device == execution_device(layers[layer])
        with vlmsae.splice(plain, layer, make_sae()):
            expected = logits(plain, inputs)
        with vlmsae.splice(model, layer, sae) as s:
            got = logits(model, inputs)
        assert s.latents.device == sae.W_dec.device and got.device == inputs["input_ids"].device
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        with vlmsae.steer(model, layer, sae, latents={3: 8.0}) as vector:
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert vector.device == sae.W_dec.device
    data = [inputs]
    table = vlmsae.evaluate(model, LAYER, vlmsae.place(model, LAYER, make_sae()), data)
    pd.testing.assert_frame_equal(table, vlmsae.evaluate(plain, LAYER, make_sae(), data), rtol=1e-4, atol=1e-4)
    # online training: the SAE of layer 1 trains on the GPU, that of layer 3 on the CPU, from the same forwards
    data = [tiny_inputs(plain, 4, seed=s) for s in range(6)]
    got, expected = train_two_layers(model, data), train_two_layers(plain, data)
    assert [got.saes[L][0].W_dec.device.type for L in (1, 3)] == ["cuda", "cpu"]
    # the GPU selects latents from bf16 scores (SAETrainer's CUDA default): the same training, not the same bits
    for g, e in zip(got.history[-2:], expected.history[-2:]):
        assert g["layer"] == e["layer"] and g["fvu"] == pytest.approx(e["fvu"], rel=0.1)
