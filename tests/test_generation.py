"""Interventions under generate(): the KV cache, use_cache=False, threads and direct submodule calls.

The oracle is plain PyTorch: a forward hook registered by hand on the decoder layer, and a greedy
loop of uncached forwards over the whole sequence. Nothing in it asks vlmsae which positions are
which; the prompt length and the attention mask say it.
"""

import threading
import warnings

import pytest
import torch

import vlmsae
from vlmsae import Kind
from vlmsae.errors import HookNameWarning, UnsupportedModelError
from vlmsae.zoo import FIRST_TEXT_ID, build_inputs, tiny_inputs, tiny_model, with_sequences

from conftest import logits

LAYER = 1
NEW = 5
SPECIAL_IDS = list(range(FIRST_TEXT_ID))  # pad, bos, eos, image, vision start / end, video: never generated
GREEDY = dict(max_new_tokens=NEW, do_sample=False, suppress_tokens=SPECIAL_IDS)
LAYER_PATHS = {"vit-gpt2": "decoder.transformer.h", "llava": "model.language_model.layers",
               "qwen2-vl": "model.language_model.layers", "qwen2.5-vl": "model.language_model.layers",
               "qwen3-vl": "model.language_model.layers", "gemma3": "model.language_model.layers",
               "paligemma": "model.language_model.layers", "idefics3": "model.text_model.layers",
               "smolvlm": "model.text_model.layers"}


def reference_generate(model, family, inputs, ids_key, mask_key, vector, where):
    """Greedy decoding by uncached forwards, adding ``vector`` at the prompt or generated positions."""
    prompt = inputs[ids_key].shape[1]
    layer = model.get_submodule(LAYER_PATHS[family])[LAYER]
    state = {}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        seq = hidden.shape[1]
        generated = torch.arange(seq) >= prompt
        chosen = generated if where == "generated" else ~generated
        mask = chosen[None, :] & (state["attention"] != 0)  # (batch, seq): never padding
        new = hidden + mask[..., None].to(hidden.dtype) * vector.to(hidden.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    sequences, step_logits = inputs[ids_key], []
    handle = layer.register_forward_hook(hook)
    try:
        for _ in range(NEW):
            full = with_sequences(model, inputs, sequences)
            state["attention"] = full[mask_key]
            with torch.no_grad():
                out = model(**full, use_cache=False).logits[:, -1]
            step_logits.append(out)
            allowed = out.clone()
            allowed[:, SPECIAL_IDS] = -torch.inf
            sequences = torch.cat([sequences, allowed.argmax(-1, keepdim=True)], 1)
    finally:
        handle.remove()
    return sequences, torch.stack(step_logits, 1)


@pytest.mark.parametrize("where", ["generated", "prompt"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_steered_generate_equals_uncached_plain_hook_reference(model, family, where, use_cache):
    info = vlmsae.layers(model)
    inputs = tiny_inputs(model, 2, padding="left")
    torch.manual_seed(0)
    vector = 4.0 * torch.randn(info.d_model)
    expected, expected_logits = reference_generate(model, family, inputs, info.ids_key, info.mask_key, vector, where)
    clean = model.generate(**inputs, **GREEDY)
    assert not torch.equal(expected, clean), "the vector must change the greedy answer for the test to mean anything"
    with vlmsae.steer(model, LAYER, vector, where=where):
        out = model.generate(**inputs, **GREEDY, use_cache=use_cache, output_logits=True,
                             return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected_logits, rtol=1e-4, atol=1e-4)


def test_uncached_generate_marks_positions_past_the_prompt_generated(model):
    info = vlmsae.layers(model)
    inputs = tiny_inputs(model, 2, padding="left")
    prompt = inputs[info.ids_key].shape[1]
    seen = []
    with vlmsae.attach(model, {(0, "resid_post"): lambda r, f: seen.append(f.kinds.clone())}):
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=False)
    assert [k.shape[1] for k in seen] == [prompt, prompt + 1, prompt + 2]
    prompt_kinds = info.kinds(inputs[info.ids_key], inputs[info.mask_key])
    for kinds in seen:
        assert torch.equal(kinds[:, :prompt], prompt_kinds)
        assert (kinds[:, prompt:] == Kind.GENERATED).all()


def test_one_prompt_token_captioner_joins_prompt_and_steps():
    model = tiny_model("vit-gpt2")
    inputs = build_inputs(model, torch.rand(1, 3, 32, 32), [[20]])  # <bos> and one text token
    with torch.no_grad(), vlmsae.record(model, [0]) as rec:
        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert rec[0].shape == (1, 3, 64)
    assert rec.kinds(0).tolist() == [[Kind.SPECIAL, Kind.TEXT, Kind.GENERATED]]


def test_a_decode_step_without_a_recognised_cache_is_an_error_not_a_guess(model, monkeypatch):
    inputs = tiny_inputs(model, 1)
    monkeypatch.setattr(vlmsae.hooks, "find_cache", lambda values: None)  # as if transformers changed the class
    with pytest.raises(UnsupportedModelError, match="no transformers Cache among the forward's arguments"):
        with vlmsae.steer(model, LAYER, torch.ones(vlmsae.layers(model).d_model), where="generated"):
            model.generate(**inputs, max_new_tokens=3, do_sample=False)


def test_submodule_called_directly_does_not_inherit_the_last_forwards_kinds():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, 2)
    language_model = model.model.language_model
    embeds = torch.randn(1, 5, 64)
    seen = []
    with torch.no_grad(), vlmsae.attach(model, {(LAYER, "resid_post"): lambda r, f: seen.append(f)}):
        model(**inputs)
        language_model(inputs_embeds=embeds)
    full, direct = seen
    assert full.kinds.shape == inputs["input_ids"].shape
    assert direct.ids is None and direct.direct
    with pytest.raises(ValueError, match="submodule called directly"):
        direct.kinds
    with pytest.raises(ValueError, match="submodule called directly"):
        with torch.no_grad(), vlmsae.steer(model, LAYER, torch.ones(64), where="text"):
            model(**inputs)
            language_model(inputs_embeds=embeds)


def test_threads_each_see_their_own_forward():
    model = tiny_model("llava")
    batches = [tiny_inputs(model, 3, padding="right", seed=0), tiny_inputs(model, 2, padding="left", seed=1)]
    info = vlmsae.layers(model)
    expected = [info.kinds(b["input_ids"], b["attention_mask"]) for b in batches]
    wrong, errors = [], []
    barrier = threading.Barrier(2)

    def hook(resid, fwd):
        me = threading.current_thread().name
        if not torch.equal(fwd.kinds, expected[int(me)]):
            wrong.append(me)

    def run(i):
        try:
            barrier.wait()
            for _ in range(40):
                with torch.no_grad():
                    model(**batches[i])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    with vlmsae.attach(model, {(layer, "resid_post"): hook for layer in range(info.n_layers)}):
        threads = [threading.Thread(target=run, args=(i,), name=str(i)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors and not wrong, f"{len(wrong)} blocks saw another thread's forward; errors: {errors}"


def test_generate_is_restored_after_the_context(model):
    inputs = tiny_inputs(model, 1)
    before = logits(model, inputs)
    with vlmsae.record(model, [0]):
        assert "generate" in vlmsae.layers(model).model.__dict__
    assert "generate" not in vlmsae.layers(model).model.__dict__
    torch.testing.assert_close(logits(model, inputs), before, rtol=0, atol=0)


def test_an_sae_used_at_another_site_than_its_hook_name_warns(model):
    info = vlmsae.layers(model)
    inputs = tiny_inputs(model, 1)
    sae = vlmsae.SAE(d_in=info.d_model, d_sae=128, k=4).eval()
    sae.metadata["hook_name"] = "blocks.2.hook_resid_post"

    def run(use: str, layer: int) -> None:
        if use in ("splice", "ablate", "steer"):
            context = {"splice": lambda: vlmsae.splice(model, layer, sae),
                       "ablate": lambda: vlmsae.ablate(model, layer, sae, [0]),
                       "steer": lambda: vlmsae.steer(model, layer, sae, {0: 1.0})}[use]
            with torch.no_grad(), context():
                model(**inputs)
        elif use == "evaluate":
            vlmsae.evaluate(model, layer, sae, [inputs], ablations=False)
        elif use == "scan":
            vlmsae.scan(model, layer, sae, [inputs], latents=[0])
        else:
            vlmsae.latent_stats(model, layer, sae, [inputs])

    for use in ("splice", "ablate", "steer", "evaluate", "scan", "latent_stats"):
        for layer in (1, 2):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run(use, layer)
            got = [str(w.message) for w in caught if issubclass(w.category, HookNameWarning)]
            if layer == 2:
                assert got == [], use
            else:
                assert len(got) == 1, use
                assert "'blocks.2.hook_resid_post'" in got[0] and "'blocks.1.hook_resid_post'" in got[0]


def test_a_callable_where_never_selects_padding(model):
    info = vlmsae.layers(model)
    inputs = tiny_inputs(model, 3, padding="left")
    pad = inputs[info.mask_key] == 0
    assert pad.any()
    vector = torch.ones(info.d_model)
    with torch.no_grad(), vlmsae.record(model, [LAYER]) as clean:
        model(**inputs)
    everywhere = lambda fwd: torch.ones(fwd.ids.shape, dtype=torch.bool)  # noqa: E731
    with torch.no_grad(), vlmsae.steer(model, LAYER, vector, where=everywhere), vlmsae.record(model, [LAYER]) as rec:
        model(**inputs)
    added = rec[LAYER] - clean[LAYER]
    assert torch.equal(added[pad], torch.zeros_like(added[pad]))
    torch.testing.assert_close(added[~pad], vector.expand(int((~pad).sum()), -1))
    with pytest.raises(vlmsae.errors.ConfigError, match="must return a"):
        with torch.no_grad(), vlmsae.steer(model, LAYER, vector, where=lambda fwd: fwd.ids.shape):
            model(**inputs)
