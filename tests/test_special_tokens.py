"""A chat template's control tokens count as SPECIAL wherever positions are chosen (issue 14 item 1).

The reference never asks vlmsae which positions are special: it finds them by id in the inputs it built.
"""

import pytest
import torch
from tokenizers import AddedToken

import vlmsae
from vlmsae import Kind, zoo
from vlmsae.buffer import RingBuffer
from vlmsae.data import LiveSource
from vlmsae.zoo import BOS, EOS, FIRST_TEXT_ID, IMAGE, PAD, VISION_END, VISION_START, build_inputs, tiny_model

LAYER = 1
# A Qwen chat prompt by hand, in the tiny vocabulary: ids for the control tokens and the role words.
IM_START, IM_END, USER, ASSISTANT, NEWLINE = range(FIRST_TEXT_ID, FIRST_TEXT_ID + 5)
CONTROL = frozenset({IM_START, IM_END})

# Ids 4 and 5 (begin / end of image) in each family's tokenizer: named by the config or by the adapter row's
# control tokens; LLaVA, PaliGemma and ViT-GPT2 have no such tokens.
WRAPS = {"qwen2-vl": {4, 5}, "qwen2.5-vl": {4, 5}, "qwen3-vl": {4, 5}, "gemma3": {4, 5}, "idefics3": {4, 5},
         "smolvlm": {4, 5}}


def test_special_token_ids_read_the_config_and_the_tokenizer(model, family):
    info = vlmsae.layers(model)
    assert vlmsae.special_token_ids(model) == info.special_ids
    tok = zoo.tokenizer(model)
    # the tokenizer's own special tokens, and the begin / end of image even where it does not mark them special
    assert set(tok.all_special_ids) == {PAD, BOS, EOS, IMAGE}
    assert vlmsae.special_token_ids(model, tok) == info.special_ids | {PAD, BOS, EOS, IMAGE} | WRAPS.get(family, set())
    tok.add_tokens([AddedToken("<|custom|>", special=True), AddedToken("<|plain|>", special=False)])
    custom, plain = tok.convert_tokens_to_ids(["<|custom|>", "<|plain|>"])
    got = vlmsae.special_token_ids(model, tok)
    assert custom in got and plain not in got
    class Processor:  # a processor holds its tokenizer
        tokenizer = tok
    assert vlmsae.special_token_ids(model, Processor()) == got


def test_special_token_ids_refuse_what_is_not_a_tokenizer():
    model = tiny_model("qwen2-vl", n_layers=2)
    with pytest.raises(vlmsae.ConfigError, match="tokenizer=dict is not a transformers tokenizer"):
        vlmsae.special_token_ids(model, {"<|im_start|>": IM_START})


@pytest.fixture(scope="module")
def chat():
    """A tiny Qwen2-VL and a batch of two chat prompts:
    ``<|im_start|> user \\n <vision_start> <image>... <vision_end> text <|im_end|> \\n <|im_start|> assistant \\n``."""
    model = tiny_model("qwen2-vl", n_layers=2)
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(NEWLINE + 1, 128, (6,), generator=g).tolist() for _ in range(2)]
    image = build_inputs(model, torch.rand(2, 3, 32, 32, generator=g), [[] for _ in texts], padding="right")
    head = torch.tensor([IM_START, USER, NEWLINE]).expand(2, -1)
    tail = torch.tensor([[*t, IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE] for t in texts])
    ids = torch.cat([head, image["input_ids"], tail], 1)
    inputs = dict(image, input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == IMAGE).long())
    return model, inputs


def test_control_tokens_are_special_in_record_only_when_named(chat):
    model, inputs = chat
    ids = inputs["input_ids"]
    control = (ids == IM_START) | (ids == IM_END)
    assert control.sum() == 6
    with torch.no_grad(), vlmsae.record(model, [LAYER], special_ids=CONTROL) as rec:
        model(**inputs)
    kinds = rec.kinds(LAYER)
    assert (kinds[control] == Kind.SPECIAL).all()
    assert torch.equal(kinds == Kind.SPECIAL, control | (ids == VISION_START) | (ids == VISION_END))
    assert torch.equal(kinds == Kind.IMAGE, ids == IMAGE)
    with torch.no_grad(), vlmsae.record(model, [LAYER]) as plain:  # the config does not name them: text
        model(**inputs)
    assert (plain.kinds(LAYER)[control] == Kind.TEXT).all()


def _buffer_tokens(model, inputs, **source) -> tuple[list[int], dict]:
    src = LiveSource(model, [inputs], "resid_post", **source)
    src.start([LAYER], {})
    buffer = RingBuffer(48, vlmsae.layers(model).d_model, outlier_factor=None, seed=0)
    src.fill({LAYER: buffer})
    return buffer.token[:48].tolist(), buffer.counts()


def test_control_tokens_stay_out_of_the_training_buffer(chat):
    model, inputs = chat
    tokens, counts = _buffer_tokens(model, inputs, special_ids=CONTROL)
    assert not CONTROL & set(tokens)
    per_batch = int(((inputs["input_ids"] == IM_START) | (inputs["input_ids"] == IM_END)).sum()) + 4  # + vision wraps
    assert counts["left_out_kind"] % per_batch == 0 and counts["left_out_kind"] > 0
    tokens, _ = _buffer_tokens(model, inputs)  # what happens without them: control tokens train the SAE as text
    assert CONTROL & set(tokens)


def test_train_keeps_control_tokens_out_of_its_buffers(chat):
    """vlmsae.train(..., special_ids=): the run's buffers hold no control token (OnlineRunConfig.special_ids)."""
    from vlmsae.train import OnlineRun, OnlineRunConfig, SAETrainerConfig

    model, inputs = chat
    sae = vlmsae.SAE(d_in=vlmsae.layers(model).d_model, d_sae=32, k=4)
    for special, leaks in ((CONTROL, False), ((), True)):
        cfg = OnlineRunConfig(steps=1, batch_size=8, buffer_size=48, outlier_factor=None, special_ids=tuple(special),
                              progress=False)
        run = OnlineRun(model, LAYER, [inputs], sae, cfg, SAETrainerConfig(), None, None)
        run.start({})
        run.fill()
        assert bool(CONTROL & set(run.buffers[LAYER].token[:48].tolist())) == leaks


def _sae(d_model: int) -> vlmsae.SAE:
    torch.manual_seed(0)
    return vlmsae.SAE(d_in=d_model, d_sae=32, k=4).eval()


def test_every_entry_point_that_chooses_positions_takes_special_ids(chat):
    model, inputs = chat
    info = vlmsae.layers(model)
    ids = inputs["input_ids"]
    special = (ids == IM_START) | (ids == IM_END) | (ids == VISION_START) | (ids == VISION_END)
    n_special = int(special.sum())
    sae = _sae(info.d_model)
    with torch.no_grad():
        clean = model(**inputs).logits

    # steer: a plain PyTorch hook adding the vector at the special positions is the reference
    vector = 3.0 * torch.randn(info.d_model)
    layer = model.get_submodule("model.language_model.layers")[LAYER]
    handle = layer.register_forward_hook(lambda m, a, out: out + special[..., None] * vector)
    try:
        with torch.no_grad():
            want = model(**inputs).logits
    finally:
        handle.remove()
    with torch.no_grad(), vlmsae.steer(model, LAYER, vector, where="special", special_ids=CONTROL):
        got = model(**inputs).logits
    assert (want - clean).abs().amax() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    for name, context in (("splice", lambda: vlmsae.splice(model, LAYER, sae, where="special", special_ids=CONTROL)),
                          ("ablate", lambda: vlmsae.ablate(model, LAYER, sae, [0, 1], where="special",
                                                           special_ids=CONTROL))):
        with torch.no_grad(), context() as s:
            model(**inputs)
        assert int(s.stats().loc["special", "tokens"]) == n_special, name

    by_id = lambda fwd: special  # noqa: E731  the positions by id, not by kind
    stats = vlmsae.latent_stats(model, LAYER, sae, [inputs], where="special", special_ids=CONTROL)
    torch.testing.assert_close(stats, vlmsae.latent_stats(model, LAYER, sae, [inputs], where=by_id))
    scanned = vlmsae.scan(model, LAYER, sae, [inputs], where="special", special_ids=CONTROL, latents=[0])
    assert scanned.tokens == n_special
    default = vlmsae.scan(model, LAYER, sae, [inputs], special_ids=CONTROL, latents=[0])  # image, text, generated
    assert default.tokens == int((inputs["attention_mask"] == 1).sum()) - n_special
    table = vlmsae.evaluate(model, LAYER, sae, [inputs], where=["special"], ablations=False, special_ids=CONTROL)
    assert int(table.loc["special", "spliced_tokens"]) == n_special
