"""The hook manager: leak-proof contexts, edits that reach the output, clear errors on bad input."""

import copy

import pytest
import torch
from torch import nn

import vlmsae
from vlmsae import Kind
from vlmsae.zoo import tiny_inputs, tiny_model

from conftest import hook_snapshot, logits


class Boom(Exception):
    pass


def test_no_leftover_hooks_after_normal_exit_block_error_and_hook_error(model):
    inputs = tiny_inputs(model, 2)
    clean = logits(model, inputs)
    before = hook_snapshot(model)
    with vlmsae.record(model, [0, 1]):
        logits(model, inputs)
    assert hook_snapshot(model) == before
    with pytest.raises(Boom), vlmsae.record(model, [0], stop=True):
        raise Boom  # an exception in the block
    assert hook_snapshot(model) == before

    def explode(resid, fwd):
        raise Boom

    with pytest.raises(Boom), vlmsae.attach(model, {(1, "resid_post"): explode, (0, "resid_pre"): lambda r, f: r}):
        logits(model, inputs)  # an exception inside a hook, mid-forward
    assert hook_snapshot(model) == before
    torch.testing.assert_close(logits(model, inputs), clean, rtol=0, atol=0)


def test_edit_changes_logits_and_generation(model):
    info = vlmsae.layers(model)
    inputs = tiny_inputs(model, 2, padding="left")
    clean = logits(model, inputs)
    clean_gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    v = torch.randn(info.d_model, generator=torch.Generator().manual_seed(1)) * 20
    fired = []

    def add(resid, fwd):
        fired.append(resid.shape[1])
        return resid + v

    with vlmsae.attach(model, {(1, "resid_post"): add}):
        edited = logits(model, inputs)
        edited_gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert (edited - clean).abs().amax() > 1e-2
    assert not torch.equal(edited_gen, clean_gen)
    assert fired[1:] == [inputs[info.ids_key].shape[1]] + [1] * 5  # every decode step, only the new position
    torch.testing.assert_close(logits(model, inputs), clean, rtol=0, atol=0)


def test_resid_pre_edit_equals_resid_post_edit_of_previous_layer(model):
    info = vlmsae.layers(model)
    if info.family == "qwen3-vl":
        pytest.skip("deepstack: the output of layer 0 is not the input of layer 1 at image positions")
    inputs = tiny_inputs(model, 2)
    v = torch.randn(info.d_model, generator=torch.Generator().manual_seed(2))
    with vlmsae.attach(model, {(0, "resid_post"): lambda r, f: r + v}):
        a = logits(model, inputs)
    with vlmsae.attach(model, {(1, "resid_pre"): lambda r, f: r + v}):
        b = logits(model, inputs)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hook_sees_kinds_of_each_forward(model):
    info = vlmsae.layers(model)
    inputs = tiny_inputs(model, 2, padding="left")
    seen = []
    with vlmsae.attach(model, {(0, "resid_post"): lambda r, f: seen.append((f.index, f.past, f.kinds.clone()))}):
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    prompt = inputs[info.ids_key].shape[1]
    assert [(i, p) for i, p, _ in seen] == [(0, 0), (1, prompt), (2, prompt + 1)]
    assert torch.equal(seen[0][2], info.kinds(inputs[info.ids_key], inputs[info.mask_key]))
    assert all((k == Kind.GENERATED).all() for _, _, k in seen[1:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    model = tiny_model("llava", dtype=dtype)
    inputs = tiny_inputs(model, 2)
    with torch.no_grad(), vlmsae.record(model, [1]) as rec:
        out = model(**inputs, output_hidden_states=True)
    assert rec[1].dtype == dtype
    torch.testing.assert_close(rec[1], out.hidden_states[2], rtol=0, atol=0)
    # a replacement in another dtype comes back in the model's own
    with torch.no_grad(), vlmsae.attach(model, {(1, "resid_post"): lambda r, f: r.float() * 0}):
        with vlmsae.record(model, [2], site="resid_pre") as nxt:
            model(**inputs)
    assert nxt[2].dtype == dtype and nxt[2].abs().sum() == 0


def test_bad_input_raises_clear_errors_and_registers_nothing(model):
    info = vlmsae.layers(model)
    before = hook_snapshot(model)
    with pytest.raises(vlmsae.LayerIndexError, match=rf"layer={info.n_layers}.*valid layers: 0..{info.n_layers - 1}"):
        with vlmsae.record(model, [0, info.n_layers]):
            pass
    with pytest.raises(vlmsae.LayerIndexError, match=rf"layer=-1 .* \(count from 0: the last is {info.n_layers - 1}\)"):
        with vlmsae.record(model, [-1]):
            pass
    with pytest.raises(vlmsae.LayerIndexError, match=r"layer='blocks.1.hook_resid_post ' is neither a layer index nor "
                       rf"a hook name .* 0..{info.n_layers - 1} .* 'blocks.{info.n_layers - 1}.hook_resid_post'"):
        with vlmsae.record(model, ["blocks.1.hook_resid_post "]):  # a stray space
            pass
    with pytest.raises(vlmsae.SiteError, match="site='resid_mid'.*valid sites"):
        with vlmsae.record(model, [0], site="resid_mid"):
            pass
    with pytest.raises(vlmsae.SiteError, match="attached twice"):
        with vlmsae.record(model, [1, 1]):
            pass
    with pytest.raises(vlmsae.SiteError, match="must keep"):
        with vlmsae.attach(model, {(0, "resid_post"): lambda r, f: r[:, :1]}):
            logits(model, tiny_inputs(model, 1))
    assert hook_snapshot(model) == before


def test_unsupported_and_compiled_models_are_refused():
    with pytest.raises(vlmsae.UnsupportedModelError, match="supported families: vit-gpt2.*llava.*qwen2-vl"):
        vlmsae.layers(nn.Linear(3, 3))
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(vlmsae.UnsupportedModelError, match="model_type='gpt2'"):
        with vlmsae.record(gpt2, [0]):
            pass
    assert not any(m._forward_hooks for m in gpt2.modules())
    model = tiny_model("llava", n_layers=1)
    compiled = torch.compile(model)
    with pytest.raises(vlmsae.UnsupportedModelError, match=r"torch.compile.*model._orig_mod"):
        with vlmsae.record(compiled, [0]):
            pass
    with pytest.raises(vlmsae.UnsupportedModelError, match="not a torch nn.Module"):
        vlmsae.layers("llava")


class TupleLayer(nn.Module):
    """A decoder layer in the style of older transformers, returning ``(hidden, attn_weights)``."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, hidden_states, attention_mask=None):
        return hidden_states + self.proj(hidden_states), None


def test_model_info_prints_in_one_line_without_the_model(model):
    """print(vlmsae.layers(model)) in a notebook shows what vlmsae found, not every module of the model."""
    info = vlmsae.layers(model)
    text = repr(info)
    assert "\n" not in text and f"n_layers={info.n_layers}" in text and f"d_model={info.d_model}" in text
    assert "Linear" not in text and len(text) < 400


def test_layers_returning_tuples():
    model = tiny_model("llava", n_layers=2)
    lm = model.model.language_model
    legacy = copy.deepcopy(lm)
    legacy.layers = nn.ModuleList([TupleLayer(64) for _ in range(2)])

    def forward(hidden_states):
        for layer in legacy.layers:
            hidden_states = layer(hidden_states)[0]
        return hidden_states

    legacy.forward = forward
    model.model.language_model = legacy
    x = torch.randn(2, 5, 64)
    v = torch.randn(64)
    with torch.no_grad(), vlmsae.record(model, [0, 1]) as rec:
        y = legacy(x)
    torch.testing.assert_close(rec[1], y, rtol=0, atol=0)
    with torch.no_grad(), vlmsae.attach(model, {(0, "resid_post"): lambda r, f: r + v}):
        edited = legacy(x)
    with torch.no_grad():
        torch.testing.assert_close(edited, legacy.layers[1](rec[0] + v)[0], rtol=0, atol=0)


def test_from_pretrained_and_accelerate_dispatch(tmp_path):
    from accelerate import dispatch_model
    from transformers import LlavaForConditionalGeneration

    model = tiny_model("llava")
    model.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True).eval()
    assert vlmsae.layers(loaded).n_layers == 4
    inputs = tiny_inputs(model, 2)
    with torch.no_grad(), vlmsae.record(model, [1, 2]) as ref:
        model(**inputs)
    # a model spread by accelerate: its own dispatch hooks stay, ours come and go
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.language_model": "cpu",
                  "lm_head": "cpu"}
    dispatched = dispatch_model(loaded, device_map=device_map, force_hooks=True)
    assert hasattr(dispatched.model.language_model, "_hf_hook")
    with torch.no_grad():
        dispatched(**inputs)  # transformers installs its own capture hooks on first use
    before = hook_snapshot(dispatched)
    with torch.no_grad(), vlmsae.record(dispatched, [1]) as rec, vlmsae.record(dispatched, [2], site="resid_pre") as pre:
        dispatched(**inputs)
    assert hook_snapshot(dispatched) == before
    torch.testing.assert_close(rec[1], ref[1], rtol=0, atol=0)
    torch.testing.assert_close(pre[2], ref[1], rtol=0, atol=0)
