"""RingBuffer: real rows in, shuffled rows out, every row read once, quotas kept."""

import pytest
import torch

import vlmsae
from vlmsae import Kind
from vlmsae.buffer import RingBuffer
from vlmsae.zoo import tiny_inputs

LAYER = 1


def fill(model, buffer, seed0=0, batch=3):
    """Run forwards into the buffer until it is full. Returns ``truth``, sample number -> (hidden states, ids,
    kinds, attention mask) of that sample, numbering samples in the order they were run (from 0 for this
    call), and the next seed."""
    truth, seed = {}, seed0
    info = vlmsae.layers(model)
    while buffer.free_rows():
        inputs = tiny_inputs(model, batch, seed=seed, padding="left" if seed % 2 else "right")
        seed += 1
        with torch.no_grad(), vlmsae.record(model, [LAYER], sink=buffer.sink()):
            out = model(**inputs, output_hidden_states=True)
        hs = out.decoder_hidden_states if info.family == "vit-gpt2" else out.hidden_states
        ids, mask = inputs[info.ids_key], inputs[info.mask_key]
        for b in range(batch):
            truth[len(truth)] = (hs[LAYER + 1][b], ids[b], info.kinds(ids, mask)[b], mask[b])
    return truth, seed


def in_order(truth, admitted):
    """(sample, position) of every non-pad position of an admitted kind, in the order the forwards wrote them."""
    return [(s, p) for s in sorted(truth) for p, (k, m) in enumerate(zip(truth[s][2], truth[s][3]))
            if m and int(k) in admitted]


def test_rows_are_real_activations_of_real_tokens(model):
    info = vlmsae.layers(model)
    buffer = RingBuffer(256, info.d_model, outlier_factor=None, seed=0)  # image, text and generated tokens
    truth, _ = fill(model, buffer)
    # the slots fill in the order the tokens came: every stored row is the real one, and the accounting adds up
    order = in_order(truth, {Kind.IMAGE, Kind.TEXT})
    assert [(int(s), int(p)) for s, p in zip(buffer.sample[:256], buffer.position[:256])] == order[:256]
    for i, (s, p) in enumerate(order[:256]):
        hs, ids, kinds, _ = truth[s]
        assert torch.equal(buffer.acts[i], hs[p]) and int(buffer.token[i]) == int(ids[p])
        assert int(buffer.kind[i]) == int(kinds[p])
    pads = sum(int((m == 0).sum()) for _, _, _, m in truth.values())
    specials = sum(int(((k == Kind.SPECIAL) & (m == 1)).sum()) for _, _, k, m in truth.values())
    assert buffer.counts() == {"kept": 256, "left_out_pad": pads, "left_out_kind": specials,
                               "left_out_outlier": 0, "left_out_full": len(order) - 256, "nonfinite": 0}
    assert pads > 0 and specials > 0 and len(order) > 256
    rows = next(buffer.read(128, batches=1))
    assert rows.acts.shape == (128, info.d_model)
    for i in range(128):
        hs, ids, kinds, _ = truth[int(rows.sample[i])]
        p = int(rows.position[i])
        torch.testing.assert_close(rows.acts[i], hs[p], rtol=0, atol=0)
        assert int(rows.token[i]) == int(ids[p]) and int(rows.kind[i]) == int(kinds[p]) != Kind.PAD


def test_special_and_outlier_tokens_are_left_out_and_counted(model):
    info = vlmsae.layers(model)
    buffer = RingBuffer(64, info.d_model, seed=0)
    inputs = tiny_inputs(model, 2, padding="right")
    kinds = info.kinds(inputs[info.ids_key], inputs[info.mask_key])
    content = int(((kinds[0] == Kind.IMAGE) | (kinds[0] == Kind.TEXT)).nonzero()[0])  # the first image or text token

    def blow_up(resid, fwd):  # one extreme-norm token per forward
        resid = resid.clone()
        resid[0, content] *= 1000
        return resid

    with torch.no_grad(), vlmsae.attach(model, {(LAYER, "resid_post"): blow_up}):
        with vlmsae.record(model, [LAYER], sink=buffer.sink()):
            model(**inputs)
            model(**inputs)  # two forwards: every count adds up over them
    c = buffer.counts()
    assert c["left_out_outlier"] == 2
    assert c["left_out_pad"] == 2 * int((inputs[info.mask_key] == 0).sum()) > 0
    assert c["left_out_kind"] == 2 * int((kinds == Kind.SPECIAL).sum())
    admitted = 2 * int(((kinds == Kind.IMAGE) | (kinds == Kind.TEXT)).sum()) - 2
    assert c["kept"] == min(admitted, 64) and c["left_out_full"] == admitted - c["kept"]


def test_outliers_are_judged_against_the_median_of_the_rows_considered():
    from vlmsae.buffer import outliers

    acts = torch.zeros(8, 3)
    acts[:, 0] = torch.tensor([10.0, 10, 20, 1000, 50, 50, 50, 50])
    among = torch.tensor([True] * 4 + [False] * 4)  # the median of the first four is 10 (of all eight: 50)
    assert outliers(acts, among, 2.0).tolist() == [False, False, False, True, True, True, True, True]  # 20 is kept
    assert outliers(acts, among, 6.0).tolist() == [False, False, False, True, False, False, False, False]


def test_every_row_is_read_once_per_cycle(model):
    info = vlmsae.layers(model)
    buffer = RingBuffer(200, info.d_model, seed=1)
    fill(model, buffer)
    written = {(int(s), int(p)) for s, p in zip(buffer.sample[:200], buffer.position[:200])}
    first = [r for r in buffer.read(20)]  # half the buffer
    assert len(first) == 5 and buffer.free_rows() == 100  # exactly the slots read are free again
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
    truth, _ = fill(model, buffer)
    for rows in buffer.read(16):
        assert (rows.kind == Kind.IMAGE).sum() == 4 and (rows.kind == Kind.TEXT).sum() == 12
    specials = sum(int(((k == Kind.SPECIAL) & (m == 1)).sum()) for _, _, k, m in truth.values())
    assert buffer.counts()["left_out_kind"] == specials  # image and text rows are each wanted by their share
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
    for cycle in range(3):  # the rest of this permutation, then two fresh ones drawn from the restored generator
        for buf in (a, b):
            fill(model, buf, seed0=50 + cycle)
        for ra, rb in zip(a.read(8), b.read(8), strict=True):
            assert torch.equal(ra.acts, rb.acts) and torch.equal(ra.sample, rb.sample)
    assert a.counts() == b.counts()


def test_write_rows_keeps_admitted_kinds_in_the_buffer_dtype():
    """Rows written directly (training from shards): admitted kinds only, in order, cast to the buffer's dtype."""
    from vlmsae.buffer import Rows

    kinds = [Kind.TEXT, Kind.SPECIAL, Kind.IMAGE, Kind.TEXT, Kind.PAD, Kind.IMAGE, Kind.TEXT, Kind.TEXT]
    n = len(kinds)
    rows = Rows(torch.randn(n, 4) * 3 + 1 / 3, torch.tensor(kinds, dtype=torch.int8),
                torch.arange(n, dtype=torch.int32), torch.arange(100, 100 + n, dtype=torch.int32),
                torch.arange(n, dtype=torch.int64))
    buffer = RingBuffer(4, 4, dtype=torch.bfloat16, kinds=("image", "text"))
    buffer.write_rows(rows)
    admitted = [i for i, k in enumerate(kinds) if k in (Kind.IMAGE, Kind.TEXT)]
    assert buffer.sample[:4].tolist() == admitted[:4] and buffer.token[:4].tolist() == [100 + i for i in admitted[:4]]
    assert buffer.acts.dtype == torch.bfloat16
    assert torch.equal(buffer.acts[:4], rows.acts[admitted[:4]].to(torch.bfloat16))
    buffer.write_rows(rows)  # into a full buffer: nothing moves, everything is counted
    assert torch.equal(buffer.acts[:4], rows.acts[admitted[:4]].to(torch.bfloat16))
    assert buffer.counts() == {"kept": 4, "left_out_pad": 0, "left_out_kind": 4, "left_out_outlier": 0,
                               "left_out_full": 2 * len(admitted) - 4, "nonfinite": 0}


def synthetic_rows(kinds, first=0):
    """Rows of the given kinds whose acts, token and sample all carry their number (first, first + 1, ...)."""
    n = len(kinds)
    number = torch.arange(first, first + n)
    return vlmsae.buffer.Rows(number[:, None].float().expand(n, 4).clone(), torch.tensor(kinds, dtype=torch.int8),
                              torch.zeros(n, dtype=torch.int32), number.int(), number)


def test_reads_that_do_not_tile_the_buffer_take_full_batches_and_never_repeat_a_row():
    buffer = RingBuffer(64, 4, seed=0)
    written, seen = 0, []
    for _ in range(5):
        free = buffer.free_rows()
        buffer.write_rows(synthetic_rows([Kind.TEXT] * free, first=written))
        written += free
        batches = list(buffer.read(10))  # 32 // 10 = 3 batches: 30 of the 32 rows a half holds
        assert [len(b.sample) for b in batches] == [10, 10, 10]
        seen += [int(s) for b in batches for s in b.sample]
    assert len(seen) == len(set(seen)) == 150 and max(seen) < written


def test_a_quota_share_of_one_row_per_batch():
    buffer = RingBuffer(8, 4, quota={"image": 0.25, "text": 0.75}, seed=0)  # 2 image slots, 6 text slots
    buffer.write_rows(synthetic_rows([Kind.IMAGE] * 2 + [Kind.TEXT] * 6))
    (rows,) = buffer.read(4)  # one image row and three text rows
    assert sorted(rows.kind.tolist()) == [Kind.IMAGE] + [Kind.TEXT] * 3


def test_bad_buffer_settings():
    with pytest.raises(vlmsae.ConfigError, match="capacity=1"):
        RingBuffer(1, 8)
    with pytest.raises(vlmsae.ConfigError, match="'pixels'"):
        RingBuffer(8, 8, kinds=["pixels"])
    with pytest.raises(vlmsae.ConfigError, match="sum to 1"):
        RingBuffer(8, 8, quota={"image": 0.5, "text": 0.6})
    with pytest.raises(vlmsae.ConfigError, match="full buffer"):
        next(RingBuffer(8, 8).read(2))
    with pytest.raises(vlmsae.ConfigError, match="a residual of width 32 does not fit this buffer's d_model=8"):
        RingBuffer(8, 8).write(torch.zeros(1, 2, 32), None)
    full = RingBuffer(8, 8)
    full.write_rows(vlmsae.buffer.Rows(torch.zeros(8, 8), torch.full((8,), int(Kind.TEXT), dtype=torch.int8),
                                       *(torch.zeros(8, dtype=t) for t in (torch.int32, torch.int32, torch.int64))))
    with pytest.raises(vlmsae.ConfigError, match=r"batch_size=8 is too large for capacity=8 \(half the buffer is "
                                                 r"read between refills\); raise capacity or lower batch_size"):
        next(full.read(8))
