"""record() captures exactly what the model computes, during forward and generate."""

import pytest
import torch

import vlmsae
from vlmsae import Kind
from vlmsae import zoo
from vlmsae.zoo import tiny_inputs, with_sequences

from conftest import logits

# The module applying the final norm, whose output transformers reports as the last hidden state.
FINAL_NORM = {"vit-gpt2": "decoder.transformer.ln_f", "idefics3": "model.text_model.norm",
              "smolvlm": "model.text_model.norm"}


def hidden_states(model, inputs):
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return out.decoder_hidden_states if vlmsae.layers(model).family == "vit-gpt2" else out.hidden_states


@pytest.mark.parametrize("padding", ["right", "left"])
def test_record_equals_output_hidden_states(model, padding):
    info = vlmsae.layers(model)
    inputs = tiny_inputs(model, 3, padding=padding)
    hs = hidden_states(model, inputs)
    every = range(info.n_layers)
    with torch.no_grad(), vlmsae.record(model, every) as post:
        model(**inputs)
    with torch.no_grad(), vlmsae.record(model, every, site="resid_pre") as pre:
        model(**inputs)
    for layer in every:
        assert post[layer].shape == (3, inputs[info.ids_key].shape[1], info.d_model)
        if layer < info.n_layers - 1:
            torch.testing.assert_close(post[layer], hs[layer + 1], rtol=0, atol=0)
        if info.family == "qwen3-vl" and 1 <= layer <= 2:
            # Deepstack adds visual features to the residual after layers 0 and 1, at image positions only:
            # the input of the next layer is not the previous layer's output there.
            image = post.kinds(0) == Kind.IMAGE
            torch.testing.assert_close(pre[layer][~image], hs[layer][~image], rtol=0, atol=0)
            assert (pre[layer][image] - hs[layer][image]).abs().amax() > 1e-3
        else:
            torch.testing.assert_close(pre[layer], hs[layer], rtol=0, atol=0)
    # transformers reports the last hidden state after the final norm: apply it to our capture.
    norm = model.get_submodule(FINAL_NORM.get(info.family, "model.language_model.norm"))
    with torch.no_grad():
        torch.testing.assert_close(norm(post[info.n_layers - 1]), hs[-1], rtol=0, atol=1e-6)


# Special tokens of each zoo family's prompt (vlmsae.zoo.LAYOUTS): <bos> and the begin / end of image.
N_SPECIAL = {"vit-gpt2": 1, "llava": 1, "qwen2-vl": 2, "qwen2.5-vl": 2, "qwen3-vl": 2, "gemma3": 3, "paligemma": 1,
             "idefics3": 4, "smolvlm": 4}


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_mask_kinds(model, family, with_tokenizer):
    info = vlmsae.layers(model)
    special = vlmsae.special_token_ids(model, zoo.tokenizer(model) if with_tokenizer else None)
    # Idefics3 / SmolVLM: only the tokenizer names <fake_token_around_image> <global-img> <fake_token_around_image>
    unnamed = 3 if family in ("idefics3", "smolvlm") and not with_tokenizer else 0
    for padding in ("right", "left"):
        inputs = tiny_inputs(model, 3, padding=padding)
        ids, attn = inputs[info.ids_key], inputs[info.mask_key]
        with torch.no_grad(), vlmsae.record(model, [0], special_ids=special) as rec:
            model(**inputs)
        kinds = rec.kinds(0)
        assert kinds.shape == ids.shape and kinds.dtype == torch.int8
        # padding is never text or image, and everything the attention mask hides is pad
        assert torch.equal(kinds == Kind.PAD, attn == 0)
        n_image = (kinds == Kind.IMAGE).sum(1)
        if info.has_image_tokens:
            assert n_image.tolist() == [(ids[0] == info.image_token_id).sum().item()] * 3
            assert n_image[0] > 0
        else:
            assert n_image.sum() == 0  # ViT-GPT2: the image enters by cross-attention, never as decoder tokens
        assert (kinds == Kind.SPECIAL).sum(1).tolist() == [N_SPECIAL[family] - unnamed] * 3
        assert (kinds == Kind.TEXT).sum(1).tolist() == [8 + unnamed, 7 + unnamed, 6 + unnamed]


def test_generate_captures_join_to_uncached_forward(model):
    info = vlmsae.layers(model)
    inputs = tiny_inputs(model, 2, padding="left")
    prompt_len = inputs[info.ids_key].shape[1]
    with torch.no_grad(), vlmsae.record(model, [0, info.n_layers - 1]) as rec:
        seqs = model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert seqs.shape[1] == prompt_len + 5
    steps = rec.steps(0)
    assert [s.shape[1] for s in steps] == [prompt_len] + [1] * 4  # the prompt, then one new position per step
    # one uncached forward over the final sequence (less its last token, which is never fed back in)
    full = with_sequences(model, inputs, seqs[:, :-1])
    with torch.no_grad(), vlmsae.record(model, [0, info.n_layers - 1]) as ref:
        model(**full, use_cache=False)
    for layer in (0, info.n_layers - 1):
        assert rec[layer].shape == ref[layer].shape
        keep = ref.kinds(layer) != Kind.PAD  # pad positions of a left-padded prompt are not part of the answer
        torch.testing.assert_close(rec[layer][keep], ref[layer][keep], rtol=1e-4, atol=1e-5)
    kinds = rec.kinds(0)
    assert (kinds[:, prompt_len:] == Kind.GENERATED).all()
    assert not (kinds[:, :prompt_len] == Kind.GENERATED).any()


def test_stop_early_gives_same_captures_and_leaves_model_usable(model):
    inputs = tiny_inputs(model, 2)
    clean = logits(model, inputs)
    with torch.no_grad(), vlmsae.record(model, [0, 1]) as full:
        model(**inputs)
    with torch.no_grad(), vlmsae.record(model, [1, 0], stop=True) as early:
        out = model(**inputs)
    assert out is None
    for layer in (0, 1):
        torch.testing.assert_close(early[layer], full[layer], rtol=0, atol=0)
    torch.testing.assert_close(logits(model, inputs), clean, rtol=0, atol=0)
    with torch.no_grad(), vlmsae.record(model, [2], site="resid_pre", stop=True) as pre:
        model(**inputs)
    same = torch.ones_like(pre.kinds(2), dtype=torch.bool)
    if vlmsae.layers(model).family == "qwen3-vl":
        same = pre.kinds(2) != Kind.IMAGE  # deepstack adds visual features between layers 1 and 2
    torch.testing.assert_close(pre[2][same], full[1][same], rtol=0, atol=0)


def test_stop_runs_no_deeper_layer(model):
    info = vlmsae.layers(model)
    ran = []
    inputs = tiny_inputs(model, 1)
    with torch.no_grad(), vlmsae.attach(model, {(info.n_layers - 1, "resid_pre"): lambda r, f: ran.append("last")}):
        with vlmsae.record(model, [1], stop=True):
            model(**inputs)
    assert ran == []


def test_stop_on_a_sharded_model_cuts_the_layer_list(model, monkeypatch):
    """Under a sharded engine (here DeepSpeed ZeRO-3's mark on a parameter; FSDP2 in tests/test_distributed.py)
    stop=True never raises out of the forward, which could leave the engine's collectives unmatched: the layer
    list is cut after the deepest site, so the forward runs to its end (the head) having run no deeper layer; the captures
    are the same and the whole list is back after the block, after an exception too."""
    from vlmsae.hooks import sharded

    info = vlmsae.layers(model)
    inputs = tiny_inputs(model, 2)
    clean = logits(model, inputs)
    with torch.no_grad(), vlmsae.record(model, [0, 1]) as full:
        model(**inputs)
    whole = info.layers
    monkeypatch.setattr(next(model.parameters()), "ds_id", 0, raising=False)
    assert sharded(model)
    ran, finished = [], []
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, layer in enumerate(whole)]
    handles.append(model.get_output_embeddings().register_forward_hook(lambda m, a, out: finished.append(True)))
    try:
        with torch.no_grad(), vlmsae.record(model, [1, 0], stop=True) as early:
            out = model(**inputs)
        with pytest.raises(RuntimeError, match="in the block"), vlmsae.record(model, [1], stop=True):
            assert vlmsae.layers(model).layers is not whole
            raise RuntimeError("in the block")
    finally:
        for handle in handles:
            handle.remove()
    assert out is None and ran == [0, 1] and finished == [True]
    for layer in (0, 1):
        torch.testing.assert_close(early[layer], full[layer], rtol=0, atol=0)
    assert vlmsae.layers(model).layers is whole
    torch.testing.assert_close(logits(model, inputs), clean, rtol=0, atol=0)


def test_sink_receives_captures_instead_of_recording(model):
    info = vlmsae.layers(model)
    got = []
    inputs = tiny_inputs(model, 2)
    with torch.no_grad(), vlmsae.record(model, [0, 2], sink=lambda L, r, f: got.append((L, r, f.kinds))) as rec:
        model(**inputs)
    assert [g[0] for g in got] == [0, 2]
    assert got[0][1].shape == (2, inputs[info.ids_key].shape[1], info.d_model)
    assert torch.equal(got[0][2], info.kinds(inputs[info.ids_key], inputs[info.mask_key]))
    with pytest.raises(ValueError, match="nothing was recorded"):
        rec[0]


def test_independent_forwards_are_not_joined(model):
    inputs = tiny_inputs(model, 2)
    with torch.no_grad(), vlmsae.record(model, [0]) as rec:
        model(**inputs)
        model(**inputs)
    assert len(rec.steps(0)) == 2
    torch.testing.assert_close(rec.steps(0)[0], rec.steps(0)[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="independent forwards"):
        rec[0]
    with pytest.raises(KeyError, match="recorded layers"):
        rec[3]
