"""Online training: FVU falls on every family, resume is exact, one forward feeds many layers."""

import json

import pytest
import torch

import vlmsae
from vlmsae import SAE, metrics
from vlmsae.shards import Shards, harvest
from vlmsae.train import TrainConfig, latest_checkpoint, train
from vlmsae.zoo import tiny_inputs

LAYER = 1
FAST = dict(batch_size=64, buffer_size=512, sync_every=25, warmup_steps=10, k_start=32, progress=False)


def batches(model, n, seed=0):
    return [tiny_inputs(model, 6, seed=seed + s, padding="left" if s % 2 else "right") for s in range(n)]


def held_out(model, layer):
    xs = []
    for b in batches(model, 3, seed=1000):
        with torch.no_grad(), vlmsae.record(model, [layer]) as rec:
            model(**b)
        xs.append(rec[layer][rec.mask(layer) >= vlmsae.Kind.IMAGE])  # image, text: what the buffer admits
    return torch.cat(xs)


def make_sae(seed=0, d_in=64):
    torch.manual_seed(seed)
    return SAE(d_in=d_in, d_sae=256, k=8)


def test_online_training_lowers_fvu_and_printed_metrics_hold_out(model):
    sae = train(model, LAYER, batches(model, 12), make_sae(), steps=150, **FAST)
    assert isinstance(sae, SAE) and not sae.training
    x = held_out(model, LAYER)
    with torch.no_grad():
        out = sae(x)
    held_fvu = metrics.fvu(x, out.recon).item()
    print(f"{vlmsae.layers(model).family}: held-out FVU {held_fvu:.3f}, L0 {metrics.l0(out.latents).item():.1f}")
    assert held_fvu < 0.6
    assert metrics.l0(out.latents).item() == pytest.approx(8)
    assert sae.metadata["hook_name"] == f"blocks.{LAYER}.hook_resid_post"
    assert sae.metadata["hf_layer_path"].endswith(f".{LAYER}")


def test_printed_metrics_match_recomputed(capsys):
    from vlmsae.zoo import tiny_model
    from vlmsae.trainer import SAETrainer

    model = tiny_model("llava")
    history = []
    original = SAETrainer.read_metrics

    def spy(self):
        m = original(self)
        history.append(m)
        return m

    SAETrainer.read_metrics = spy
    try:
        sae = train(model, LAYER, batches(model, 12), make_sae(), steps=200, **FAST)
    finally:
        SAETrainer.read_metrics = original
    last = history[-1]
    x = held_out(model, LAYER)
    with torch.no_grad():
        out = sae(x)
    # the last readout (training batches, the final 25 steps) agrees with a held-out recomputation
    assert last.fvu == pytest.approx(metrics.fvu(x, out.recon).item(), abs=0.1)
    assert last.l0 == pytest.approx(metrics.l0(out.latents).item(), abs=0.5)
    assert last.fvu < history[0].fvu


def test_interrupt_resume_equals_uninterrupted(tmp_path):
    from vlmsae.zoo import tiny_model

    model = tiny_model("qwen2-vl")
    data = batches(model, 10)
    cfg = dict(FAST, steps=96, checkpoint_every=16)
    ref_history, resumed_history = [], []
    ref = train(model, LAYER, data, make_sae(), out=tmp_path / "ref", history=ref_history, **cfg)

    class Interrupt(Exception):
        pass

    class Flaky:
        """The same data, raising after 20 batches (mid-run, after a checkpoint)."""

        def __iter__(self):
            for i, b in enumerate(data * 100):
                if i == 20:
                    raise Interrupt
                yield b

    with pytest.raises(Interrupt):
        train(model, LAYER, Flaky(), make_sae(), out=tmp_path / "run", **cfg)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and 0 < json.loads((ckpt / "state.json").read_text())["step"] < 96
    resumed = train(model, LAYER, data, make_sae(seed=123), out=tmp_path / "run", resume=True,
                    history=resumed_history, **cfg)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert resumed_history[-1] == ref_history[-1]  # the printed metrics continue exactly too
    assert SAE.load(tmp_path / "run" / f"L{LAYER}").cfg.d_sae == 256


def test_two_layers_from_one_forward_equal_each_alone():
    from vlmsae.zoo import tiny_model

    model = tiny_model("llava")
    data = batches(model, 10)
    both = train(model, [0, 2], data, {0: make_sae(0), 2: make_sae(2)}, steps=40, **FAST)
    alone0 = train(model, 0, data, make_sae(0), steps=40, **FAST)
    alone2 = train(model, 2, data, make_sae(2), steps=40, **FAST)
    for layer, alone in ((0, alone0), (2, alone2)):
        for name, tensor in alone.state_dict().items():
            assert torch.equal(both[layer].state_dict()[name], tensor), (layer, name)


def test_several_saes_on_one_layer_and_quota():
    from vlmsae.zoo import tiny_model

    model = tiny_model("llava")
    saes = train(model, LAYER, batches(model, 10), [make_sae(0), SAE(d_in=64, d_sae=128, k=4)], steps=30,
                 quota={"image": 0.5, "text": 0.5}, **FAST)
    assert [s.cfg.d_sae for s in saes] == [256, 128]
    assert saes[0].metadata["token_kinds"] == ["image", "text"]


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    from vlmsae.zoo import tiny_model

    model = tiny_model("llava")
    cfg = dict(FAST, steps=64, checkpoint_every=8)
    train(model, LAYER, batches(model, 6), make_sae(), out=tmp_path, **cfg)
    good = latest_checkpoint(tmp_path)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    calls = {"n": 0}

    def poison(resid, fwd):
        calls["n"] += 1
        return resid * float("nan") if calls["n"] > 1 else None  # the first refill after resuming

    with vlmsae.attach(model, {(LAYER - 1, "resid_post"): poison}):
        with pytest.raises(vlmsae.NonFiniteError, match=rf"activations of layer {LAYER} at step \d+.*{good}"):
            train(model, LAYER, batches(model, 6), make_sae(), out=tmp_path, resume=True,
                  **dict(cfg, steps=128, outlier_factor=None))
    assert latest_checkpoint(tmp_path) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_one_readout_cadence_even_with_a_trainer_config():
    """A TrainerConfig with its own sync_every cannot move the trainers' readout off TrainConfig's steps
    (the input NaN check is placed just before them)."""
    from vlmsae.trainer import TrainerConfig
    from vlmsae.zoo import tiny_model

    model = tiny_model("llava")
    history = []
    train(model, LAYER, batches(model, 6), make_sae(), trainer_cfg=TrainerConfig(sync_every=7), history=history,
          **dict(FAST, steps=60, sync_every=20))
    assert [h["step"] for h in history] == [20, 40, 60]


def test_train_from_shards(tmp_path):
    from vlmsae.zoo import tiny_model

    model = tiny_model("llava")
    folder = harvest(model, [0, LAYER], batches(model, 8), tmp_path / "shards", shard_rows=300)
    shards = Shards(folder, chunk_rows=128)
    assert shards.layers == [0, LAYER] and len(shards.manifest["shards"]["1"]) >= 2
    sae = train(None, LAYER, shards, make_sae(), steps=100, **FAST)
    x = held_out(model, LAYER)
    with torch.no_grad():
        assert metrics.fvu(x, sae(x).recon).item() < 0.7
    assert sae.metadata["hook_name"] == "blocks.1.hook_resid_post"
    with pytest.raises(vlmsae.ConfigError, match="layer=3 was not harvested"):
        next(shards.stream(3))


def test_bad_train_settings(tmp_path):
    from vlmsae.zoo import tiny_model

    model = tiny_model("llava", n_layers=2)
    with pytest.raises(vlmsae.ConfigError, match="buffer_size=100 must be at least 2 x batch_size=64"):
        TrainConfig(batch_size=64, buffer_size=100)
    with pytest.raises(vlmsae.ConfigError, match="d_in=32.*d_model=64"):
        train(model, 0, [], make_sae(d_in=32), **FAST)
    with pytest.raises(vlmsae.LayerIndexError, match="layer=5"):
        train(model, 5, [], make_sae(), **FAST)
    with pytest.raises(vlmsae.ConfigError, match="data ran out after 0 batches"):
        train(model, 0, [], make_sae(), **FAST)
    no_images = tiny_inputs(model, 2)
    no_images["input_ids"] = no_images["input_ids"].masked_fill(no_images["input_ids"] == 3, 9)
    with pytest.raises(vlmsae.ConfigError, match="pixel_values but no image token"):
        train(model, 0, [no_images], make_sae(), out=tmp_path / "x", **FAST)
    assert not (tmp_path / "x").exists()
    with pytest.raises(vlmsae.ConfigError, match="resume=True needs out="):
        train(model, 0, [], make_sae(), resume=True, **FAST)
