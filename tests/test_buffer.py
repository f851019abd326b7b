"""RingBuffer: real rows in, shuffled rows out, every row read once, quotas kept."""

import pytest
import torch

import vlmsae
from vlmsae import Kind
from vlmsae.buffer import RingBuffer
from vlmsae.zoo import tiny_inputs

LAYER = 1


def fill(model, buffer, seed0=0, batch=3):
    """Run forwards into the buffer until it is full; return the hidden states of each batch by sample id."""
    truth, seed = {}, seed0
    while buffer.free_rows():
        inputs = tiny_inputs(model, batch, seed=seed, padding="left" if seed % 2 else "right")
        seed += 1
        with torch.no_grad(), vlmsae.record(model, [LAYER], sink=buffer.sink()):
            out = model(**inputs, output_hidden_states=True)
        hs = out.decoder_hidden_states if vlmsae.layers(model).family == "vit-gpt2" else out.hidden_states
        info = vlmsae.layers(model)
        for b in range(batch):
            truth[buffer.samples - batch + b] = (hs[LAYER + 1][b], inputs[info.ids_key][b],
                                                 info.kinds(inputs[info.ids_key], inputs[info.mask_key])[b])
    return truth, seed


def test_rows_are_real_activations_of_real_tokens(model):
    info = vlmsae.layers(model)
    buffer = RingBuffer(256, info.d_model, kinds=("image", "text", "special"), seed=0)
    truth, _ = fill(model, buffer)
    rows = next(buffer.read(128, batches=1))
    assert rows.acts.shape == (128, info.d_model)
    for i in range(128):
        hs, ids, kinds = truth[int(rows.sample[i])]
        p = int(rows.position[i])
        torch.testing.assert_close(rows.acts[i], hs[p], rtol=0, atol=0)
        assert int(rows.token[i]) == int(ids[p]) and int(rows.kind[i]) == int(kinds[p]) != Kind.PAD
    counts = buffer.counts()
    assert counts["left_out_pad"] > 0 and counts["kept"] >= 256


def test_special_and_outlier_tokens_are_left_out_and_counted(model):
    info = vlmsae.layers(model)
    buffer = RingBuffer(64, info.d_model, seed=0)
    inputs = tiny_inputs(model, 2, padding=None)

    def blow_up(resid, fwd):  # one extreme-norm token
        resid = resid.clone()
        resid[0, -1] *= 1000
        return resid

    with torch.no_grad(), vlmsae.attach(model, {(LAYER, "resid_post"): blow_up}):
        with vlmsae.record(model, [LAYER], sink=buffer.sink()):
            model(**inputs)
    kinds = info.kinds(inputs[info.ids_key], inputs[info.mask_key])
    c = buffer.counts()
    assert c["left_out_outlier"] == 1
    assert c["left_out_kind"] == int((kinds == Kind.SPECIAL).sum())
    assert c["kept"] == int((kinds != Kind.SPECIAL).sum()) - 1 - c["left_out_full"]


def test_every_row_is_read_once_per_cycle(model):
    info = vlmsae.layers(model)
    buffer = RingBuffer(200, info.d_model, seed=1)
    fill(model, buffer)
    written = {(int(s), int(p)) for s, p in zip(buffer.sample[:200], buffer.position[:200])}
    first = [r for r in buffer.read(20)]  # half the buffer
    assert len(first) == 5
    _, _ = fill(model, buffer, seed0=100)
    second = [r for r in buffer.read(20)]
    seen = [(int(s), int(p)) for r in first + second for s, p in zip(r.sample, r.position)]
    old = [t for t in seen if t in written]
    assert len(old) == len(set(old)) == 200  # every row written before the cycle, read exactly once
    # batches mix many samples
    assert len(set(first[0].sample.tolist())) > 5


def test_quota_shares_every_batch(model):
    info = vlmsae.layers(model)
    if not info.has_image_tokens:
        with pytest.raises(vlmsae.ConfigError, match="quota"):
            RingBuffer(64, info.d_model, kinds=("text",), quota={"image": 0.5, "text": 0.5})
        return
    buffer = RingBuffer(128, info.d_model, quota={"image": 0.25, "text": 0.75}, seed=0)
    fill(model, buffer)
    for rows in buffer.read(16):
        assert (rows.kind == Kind.IMAGE).sum() == 4 and (rows.kind == Kind.TEXT).sum() == 12
    image_only = RingBuffer(32, info.d_model, kinds="image")
    fill(model, image_only)
    assert (next(image_only.read(8)).kind == Kind.IMAGE).all()


def test_state_round_trip_continues_identically(model):
    info = vlmsae.layers(model)
    a = RingBuffer(64, info.d_model, seed=3)
    fill(model, a)
    list(a.read(8))
    b = RingBuffer(64, info.d_model, seed=99)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    for buf in (a, b):
        fill(model, buf, seed0=50)
    for ra, rb in zip(a.read(8), b.read(8)):
        assert torch.equal(ra.acts, rb.acts) and torch.equal(ra.sample, rb.sample)


def test_bad_buffer_settings():
    with pytest.raises(vlmsae.ConfigError, match="capacity=1"):
        RingBuffer(1, 8)
    with pytest.raises(vlmsae.ConfigError, match="'pixels'"):
        RingBuffer(8, 8, kinds=["pixels"])
    with pytest.raises(vlmsae.ConfigError, match="sum to 1"):
        RingBuffer(8, 8, quota={"image": 0.5, "text": 0.6})
    with pytest.raises(vlmsae.ConfigError, match="full buffer"):
        next(RingBuffer(8, 8).read(2))
