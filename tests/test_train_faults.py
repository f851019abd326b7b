"""Faults that must stop or be handled by training (issue 11): NaN/Inf that a filter could hide,
half-precision SAEs, training under no_grad, and a residual of the wrong width."""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlmsae
from vlmsae import SAE, Kind, NonFiniteError
from vlmsae.buffer import RingBuffer, Rows
from vlmsae.shards import Shards, harvest
from vlmsae.train import latest_checkpoint, train
from vlmsae.trainer import SAETrainer
from vlmsae.zoo import tiny_inputs, tiny_model

LAYER = 1
FAST = dict(batch_size=64, buffer_size=512, sync_every=4, warmup_steps=2, k_start=None, progress=False)
KINDS = ("topk", "batchtopk", "relu", "jumprelu")


@pytest.fixture(scope="module")
def llava():
    return tiny_model("llava", n_layers=2)


def batches(model, n, seed=0):
    return [tiny_inputs(model, 6, seed=seed + s, padding=None) for s in range(n)]


def make_sae(kind="topk", dtype="float32", seed=0):
    torch.manual_seed(seed)
    return SAE(d_in=64, d_sae=128, k=8, architecture=kind, dtype=dtype)


class Poison:
    """A plain forward hook on a decoder layer: writes ``value`` into one element of one content token's
    residual, in the ``at``-th forward (counted from 1), and notes what the run had done by then."""

    def __init__(self, model, layer: int, value: float, at: int, out=None):
        self.info, self.value, self.at, self.out = vlmsae.layers(model), value, at, out
        self.layer, self.calls, self.checkpoint = self.info.layers[layer], 0, None

    def __enter__(self):
        self.handle = self.layer.register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def hook(self, module, args, output):
        self.calls += 1
        if self.calls == self.at:
            hidden = output[0] if isinstance(output, tuple) else output
            hidden[0, -1, 5] = self.value  # the last position of sample 0: a text token (no padding)
            self.checkpoint = latest_checkpoint(self.out) if self.out is not None else None


def test_the_poisoned_position_is_a_content_token(llava):
    b = batches(llava, 1)[0]
    kinds = vlmsae.layers(llava).kinds(b["input_ids"], b["attention_mask"])
    assert kinds[0, -1] == Kind.TEXT


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_nonfinite_activation_stops_training_naming_step_layer_checkpoint(llava, value, tmp_path):
    # forward 8 falls in a refill after the first read phase, so a checkpoint exists by then; an Inf row
    # has an extreme norm, and the outlier filter must not be what sees it first
    with Poison(llava, LAYER, value, at=8, out=tmp_path) as poison:
        with pytest.raises(NonFiniteError) as caught:
            train(llava, LAYER, batches(llava, 6), make_sae(), steps=40, out=tmp_path, checkpoint_every=4, **FAST)
    good = poison.checkpoint
    assert good is not None, "the poisoned forward ran before any checkpoint: move it later"
    steps_done = int(good.name.split("-")[1])  # every read phase ends with a checkpoint (checkpoint_every=4)
    message = str(caught.value)
    assert f"activations of layer {LAYER} at step {steps_done + 1};" in message
    assert str(good) in message
    assert latest_checkpoint(tmp_path) == good  # never overwritten by the bad state


def test_nonfinite_activation_stops_training_without_checkpoints(llava):
    with Poison(llava, LAYER, float("inf"), at=2):
        with pytest.raises(NonFiniteError, match=rf"activations of layer {LAYER} at step 1;.*no checkpoint"):
            train(llava, LAYER, batches(llava, 6), make_sae(), steps=12, **FAST)


def test_nonfinite_activation_stops_harvest(llava, tmp_path):
    with Poison(llava, LAYER, float("inf"), at=2):
        with pytest.raises(NonFiniteError, match=rf"activations of layer {LAYER} in data batch 1 \(samples 6\.\.11\)"):
            folder = harvest(llava, [0, LAYER], batches(llava, 4), tmp_path / "shards", shard_rows=300)
            train(None, LAYER, Shards(folder), make_sae(), steps=12, **FAST)


def test_nonfinite_row_in_shards_stops_training_even_if_never_read(llava, tmp_path):
    folder = harvest(llava, [LAYER], batches(llava, 6), tmp_path / "shards", shard_rows=4096)
    path = folder / f"L{LAYER}-00000.safetensors"
    shard = load_file(str(path))
    # The first fill writes shard rows 0..511 to slots 0..511; the one step reads 64 of them, in the order of the
    # buffer's permutation (seeded seed + layer). Poison a row that this step does not read.
    read = torch.randperm(512, generator=torch.Generator().manual_seed(LAYER))[:64].tolist()
    row = next(i for i in range(300, 512) if i not in read)
    shard["acts"][row, 7] = float("inf")
    save_file(shard, str(path))
    with pytest.raises(NonFiniteError, match=rf"activations of layer {LAYER} at step 1;"):
        train(None, LAYER, Shards(folder, chunk_rows=128), make_sae(), steps=1, **FAST)


def test_buffer_counts_nonfinite_rows_before_any_filter():
    buffer = RingBuffer(64, 4, outlier_factor=10.0)
    acts = torch.ones(2, 5, 4)
    acts[0, 1, 2] = float("inf")  # an extreme norm: the outlier filter would take it
    acts[1, 3, 0] = float("nan")
    kinds = torch.full((2, 5), int(Kind.TEXT), dtype=torch.int8)
    kinds[1, 4] = Kind.PAD
    acts[1, 4] = float("nan")  # padding never enters, finite or not
    fwd = type("Fwd", (), {"past": 0, "kinds": kinds, "ids": None})()
    buffer.write(acts, fwd)
    assert buffer.counts()["nonfinite"] == 2
    rows = Rows(torch.ones(3, 4), torch.full((3,), int(Kind.IMAGE), dtype=torch.int8), torch.zeros(3, dtype=torch.int32),
                torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.long))
    rows.acts[2, 1] = -float("inf")
    buffer.write_rows(rows)
    assert buffer.counts()["nonfinite"] == 3


# --- half-precision SAEs ------------------------------------------------------------------------

@pytest.mark.parametrize("kind,dtype", [(k, "bfloat16") for k in KINDS] + [("topk", "float16"), ("relu", "float16")])
def test_half_precision_sae_trains_like_its_float32_twin(kind, dtype):
    """A bf16 / fp16 SAE trains float32 master weights: its weights are those of a float32 SAE with the same
    start, rounded to its dtype after every step."""
    half = make_sae(kind, dtype)
    twin = make_sae(kind, "float32")
    twin.load_state_dict(half.state_dict())  # the same (half-representable) start
    start = half.W_dec.detach().clone()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(128, 64, generator=g) * 3 + 1 for _ in range(6)]
    trainers = [SAETrainer(s, sync_every=3) for s in (half, twin)]
    for x in xs:
        for t in trainers:
            t.step(x)
    for name, value in half.state_dict().items():
        assert value.dtype == (torch.float32 if name == "act_scale" else getattr(torch, dtype)), name
        assert torch.equal(value, twin.state_dict()[name].to(value.dtype)), name
    assert not torch.equal(half.W_dec, start)
    assert [m.loss for m in trainers[0].history] == [m.loss for m in trainers[1].history]


@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_sae_trains_online(llava, kind):
    sae = make_sae(kind).to(torch.bfloat16)  # .to() as well as dtype=
    start = sae.W_dec.detach().clone()
    history = []
    out = train(llava, LAYER, batches(llava, 6), sae, steps=8, history=history, **FAST).sae
    assert out is sae and sae.W_dec.dtype == torch.bfloat16 and not torch.equal(sae.W_dec, start)
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    assert [h["step"] for h in history] == [4, 8]


# --- training under no_grad ---------------------------------------------------------------------

def test_train_under_no_grad(llava):
    reference = train(llava, LAYER, batches(llava, 6), make_sae(), steps=8, **FAST).sae
    with torch.no_grad():
        quiet = train(llava, LAYER, batches(llava, 6), make_sae(), steps=8, **FAST).sae
    assert torch.equal(quiet.W_dec, reference.W_dec)


def test_train_after_set_grad_enabled_false(llava):
    reference = train(llava, LAYER, batches(llava, 6), make_sae(), steps=8, **FAST).sae
    torch.set_grad_enabled(False)
    try:
        quiet = train(llava, LAYER, batches(llava, 6), make_sae(), steps=8, **FAST).sae
        assert not torch.is_grad_enabled()  # the caller's setting is left as it was
    finally:
        torch.set_grad_enabled(True)
    assert torch.equal(quiet.W_dec, reference.W_dec)


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_step_under_no_grad_equals_a_step_with_grad(kind):
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(2))
    saes = [make_sae(kind), make_sae(kind)]
    SAETrainer(saes[0]).step(x)
    with torch.no_grad():
        SAETrainer(saes[1]).step(x)
    for a, b in zip(saes[0].parameters(), saes[1].parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(saes[1].W_dec, make_sae(kind).W_dec)  # it did move


# --- reconstruct checks the width ---------------------------------------------------------------

def test_reconstruct_refuses_a_residual_of_another_width():
    sae = make_sae()
    with pytest.raises(vlmsae.ConfigError, match=re.escape("d_in=64 but this residual has width 32")):
        vlmsae.reconstruct(torch.randn(2, 3, 32), sae)
    assert vlmsae.reconstruct(torch.randn(2, 3, 64), sae).shape == (2, 3, 64)
