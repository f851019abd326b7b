"""Online training: FVU falls on every family, resume is exact, one forward feeds many layers."""

import json
import re
from collections import Counter

import pytest
import torch

import vlmsae
from vlmsae import SAE, Kind, metrics, zoo
from vlmsae.shards import Shards, harvest
from vlmsae.train import OnlineRunConfig, TrainResult, latest_checkpoint, train
from vlmsae.trainer import SAETrainer
from vlmsae.zoo import tiny_inputs

from conftest import topk_by_hand

LAYER = 1
FAST = dict(batch_size=64, buffer_size=512, sync_every=25, warmup_steps=10, k_start=32, progress=False)


def batches(model, n, seed=0):
    return [tiny_inputs(model, 6, seed=seed + s, padding="left" if s % 2 else "right") for s in range(n)]


def held_out(model, layer):
    xs = []
    for b in batches(model, 3, seed=1000):
        with torch.no_grad(), vlmsae.record(model, [layer]) as rec:
            model(**b)
        xs.append(rec[layer][rec.kinds(layer) >= vlmsae.Kind.IMAGE])  # image, text: what the buffer admits
    return torch.cat(xs)


MATRYOSHKA = {"architecture": "batchtopk", "matryoshka_widths": (16, 64, 256)}


def make_sae(seed=0, d_in=64, **fields):
    torch.manual_seed(seed)
    return SAE(d_in=d_in, d_sae=256, k=8, **fields)


def kinds_by_row(model, data, layer):
    """Every residual row that ``data`` gives at ``layer`` of a LLaVA zoo model (its bytes) -> its token kind,
    read from ``output_hidden_states`` and the zoo's token ids, with no vlmsae code involved."""
    kind_of = {}
    for batch in data:
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states[layer + 1]  # output of `layer`
        ids, attended = batch["input_ids"], batch["attention_mask"].bool()
        kind = torch.where(ids == zoo.IMAGE, int(Kind.IMAGE),
                           torch.where(ids >= zoo.FIRST_TEXT_ID, int(Kind.TEXT), int(Kind.SPECIAL)))
        for row, k in zip(hidden[attended], kind[attended]):
            kind_of[row.numpy().tobytes()] = Kind(int(k))
    return kind_of


def spy_on_steps(monkeypatch, before_step=None):
    """Record ``(sae, x)`` of every ``SAETrainer.step`` (and call ``before_step(trainer, x)`` first)."""
    fed = []
    original = SAETrainer.step

    def step(self, x, k=None, kinds=None):
        fed.append((self.sae, x.detach().clone()))
        if before_step is not None:
            before_step(self, x)
        return original(self, x, k=k, kinds=kinds)

    monkeypatch.setattr(SAETrainer, "step", step)
    return fed


def test_online_training_lowers_fvu_and_printed_metrics_hold_out(model):
    sae = train(model, LAYER, batches(model, 12), make_sae(), steps=150, **FAST).sae
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


def test_printed_metrics_match_recomputed(capsys, monkeypatch):
    """The progress bar's numbers, read from stderr, against the same quantities recomputed by hand from the
    batches the trainer was fed and the weights each step started from."""
    from vlmsae.zoo import tiny_model

    model = tiny_model("llava")
    data = batches(model, 12)
    kind_of = kinds_by_row(model, data, LAYER)
    steps, window, batch_size = 200, FAST["sync_every"], FAST["batch_size"]
    horizon = 32  # dead_tokens=2000: a latent is alive iff it fired in the last ceil(2000 / 64) = 32 steps
    torch.manual_seed(0)
    sae = SAE(d_in=64, d_sae=256, k=8, dead_tokens=2000)
    by_hand = []  # (x, recon, latents) of the last `horizon` steps, from the weights before each step

    def record_by_hand(trainer, x):
        if trainer.n_steps >= steps - horizon:
            with torch.no_grad():
                by_hand.append((x, *topk_by_hand(trainer.sae, x)))

    spy_on_steps(monkeypatch, record_by_hand)
    history = []
    # the by-hand top-k is float32: so is the trainer's selection (bf16 by default on a CPU with native bf16)
    trained = train(model, LAYER, data, sae, steps=steps, history=history, compute_dtype="float32",
                    **dict(FAST, progress=True)).sae
    err = capsys.readouterr().err
    final = [line for line in re.split(r"[\r\n]", err) if f"{steps}/{steps}" in line][-1]
    printed = re.search(r"L1 fvu (\S+) l0 (\S+) dead (\S+) \(silent (\d+) tok\) \| image (\S+)/(\d+) \| text (\S+)/(\d+)",
                        final)
    assert printed, final
    fvu, l0, dead, silent, image_fvu, image_l0, text_fvu, text_l0 = map(float, printed.groups())
    assert silent == 2000  # the dead window: dead_tokens, fewer than the 200 * 64 tokens trained

    # the last readout: steps 176..200, each scored before its own update
    assert len(by_hand) == horizon
    last = by_hand[-window:]
    squared_error = sum((x - recon).pow(2).sum() for x, recon, _ in last)
    variance = sum((x - x.mean(0)).pow(2).sum() for x, _, _ in last)
    expected = {"fvu": (squared_error / variance).item(),
                "l0": sum((z != 0).sum().item() for _, _, z in last) / (window * batch_size),
                "dead_fraction": 1 - torch.stack([(z != 0).any(0) for _, _, z in by_hand]).any(0).float().mean().item()}
    # printed with 3, 1 and 2 decimals: half a unit of the last digit, and a little for float32 sums
    assert fvu == pytest.approx(expected["fvu"], abs=6e-4)
    assert l0 == pytest.approx(expected["l0"], abs=0.06)
    assert dead == pytest.approx(expected["dead_fraction"], abs=0.006)
    # the readout the bar formats, at full precision (a latent more or less dead is 1/256)
    readouts = [h for h in history if h["sae"] == 0]
    assert [h["step"] for h in readouts] == list(range(window, steps + 1, window))
    assert readouts[-1]["fvu"] == pytest.approx(expected["fvu"], rel=1e-4)
    assert readouts[-1]["l0"] == pytest.approx(expected["l0"], rel=1e-6)
    assert readouts[-1]["dead_fraction"] == pytest.approx(expected["dead_fraction"], abs=1e-9)
    assert readouts[-1]["fvu"] < readouts[0]["fvu"]
    # per token kind: the final SAE on the last batch
    x = by_hand[-1][0]
    kinds = torch.tensor([int(kind_of[row.numpy().tobytes()]) for row in x])
    with torch.no_grad():
        recon, latents = topk_by_hand(trained, x)
    for kind, kind_fvu, kind_l0 in ((Kind.IMAGE, image_fvu, image_l0), (Kind.TEXT, text_fvu, text_l0)):
        sel = kinds == kind
        by_kind = (x[sel] - recon[sel]).pow(2).sum() / (x[sel] - x[sel].mean(0)).pow(2).sum()
        assert kind_fvu == pytest.approx(by_kind.item(), abs=6e-4), kind
        assert kind_l0 == pytest.approx((latents[sel] != 0).sum(-1).float().mean().item(), abs=0.51), kind


def test_the_run_prints_its_token_mix_and_offers_a_balanced_quota(capsys):
    """The default mix is the data's (mostly image rows on LLaVA): the run says so once, after the first fill;
    quota="balanced" gives image and text equal shares (text alone without image tokens); a quota the data cannot
    fill stops with an error instead of forwarding for ever."""
    from vlmsae.zoo import tiny_model

    model = tiny_model("llava")
    data = batches(model, 6)
    train(model, LAYER, data, make_sae(), steps=2, **dict(FAST, progress=True))
    said = capsys.readouterr()
    line = [x for x in (said.out + said.err).splitlines() if x.startswith("buffer rows by token kind")]
    assert len(line) == 1 and "quota='balanced'" in line[0], line
    assert "times over" not in said.out + said.err  # six batches fill the buffer: no rows repeat
    image, text = map(int, re.search(r"layer 1: image (\d+)%, text (\d+)%", line[0]).groups())
    assert image + text == 100 and image > 60  # the data's own mix: mostly image rows
    run = train(model, LAYER, data, make_sae(), steps=2, quota="balanced", **FAST)
    assert run.sae.metadata["token_kinds"] == ["image", "text"]
    captioner = tiny_model("vit-gpt2")
    text_only = train(captioner, LAYER, batches(captioner, 6), make_sae(), steps=2, quota="balanced", **FAST)
    assert text_only.sae.metadata["token_kinds"] == ["text"]
    with pytest.raises(vlmsae.ConfigError, match=r"20 forwards added no row to layer 1's buffer.*\[\['image'\]\]"):
        train(captioner, LAYER, batches(captioner, 6), make_sae(), steps=2, quota={"image": 0.5, "text": 0.5},
              **FAST)
    with pytest.raises(vlmsae.ConfigError, match="quota='even' must be"):
        train(model, LAYER, data, make_sae(), steps=2, quota="even", **FAST)


def test_readouts_report_fvu_l0_and_dead_latents_per_token_kind():
    """Each readout adds FVU, L0 and the dead fraction (latents silent on all those tokens) of the batch's image
    rows and of its text rows, with the tokens they were measured on."""
    from vlmsae.zoo import tiny_model

    model = tiny_model("llava")
    history = []
    train(model, LAYER, batches(model, 6), make_sae(), steps=25, quota="balanced", history=history, **FAST)
    last = history[-1]
    assert last["tokens_image"] == last["tokens_text"] == FAST["batch_size"] // 2
    for kind in ("image", "text"):
        assert 0 < last[f"fvu_{kind}"] < 2 and 0 < last[f"l0_{kind}"] <= 8 and 0 < last[f"dead_{kind}"] < 1


@pytest.mark.parametrize("recipe", [{}, MATRYOSHKA], ids=["topk", "matryoshka"])
def test_interrupt_resume_equals_uninterrupted(tmp_path, recipe):
    from vlmsae.zoo import tiny_model

    model = tiny_model("qwen2-vl")
    data = batches(model, 10)
    cfg = dict(FAST, steps=96, checkpoint_every=16)
    ref_history, resumed_history = [], []
    ref = train(model, LAYER, data, make_sae(**recipe), out=tmp_path / "ref", history=ref_history, **cfg).sae

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
        train(model, LAYER, Flaky(), make_sae(**recipe), out=tmp_path / "run", **cfg)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and 0 < json.loads((ckpt / "state.json").read_text())["step"] < 96
    resumed = train(model, LAYER, data, make_sae(seed=123, **recipe), out=tmp_path / "run", resume=True,
                    history=resumed_history, **cfg).sae
    for name, tensor in ref.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert resumed_history[-1] == ref_history[-1]  # the printed metrics continue exactly too
    assert SAE.load(tmp_path / "run" / f"L{LAYER}").cfg.d_sae == 256
    assert SAE.load(tmp_path / "run" / f"L{LAYER}").cfg.matryoshka_widths == recipe.get("matryoshka_widths")


def test_two_layers_from_one_forward_equal_each_alone():
    from vlmsae.zoo import tiny_model

    model = tiny_model("llava")
    data = batches(model, 10)
    both = train(model, [0, 2], data, {0: make_sae(0), 2: make_sae(2)}, steps=40, **FAST).saes
    alone0 = train(model, 0, data, make_sae(0), steps=40, **FAST).sae
    alone2 = train(model, 2, data, make_sae(2), steps=40, **FAST).sae
    for layer, alone in ((0, alone0), (2, alone2)):
        for name, tensor in alone.state_dict().items():
            assert torch.equal(both[layer][0].state_dict()[name], tensor), (layer, name)


def test_several_saes_on_one_layer_and_quota(monkeypatch):
    """Both SAEs of one layer take every step on the same batches, and each batch holds the quota's
    shares of image and text rows, not the data's own mix."""
    from vlmsae.zoo import tiny_model

    model = tiny_model("llava")
    data = batches(model, 10)
    kind_of = kinds_by_row(model, data, LAYER)
    mix = Counter(kind_of.values())
    assert mix[Kind.IMAGE] / (mix[Kind.IMAGE] + mix[Kind.TEXT]) > 0.65  # the quota has a mix to change
    saes = [make_sae(0), SAE(d_in=64, d_sae=128, k=4)]
    initial = [{name: p.detach().clone() for name, p in s.named_parameters()} for s in saes]
    fed = spy_on_steps(monkeypatch)
    history = []
    trained = train(model, LAYER, data, saes, steps=30, quota={"image": 0.5, "text": 0.5}, history=history,
                    **FAST).saes[LAYER]
    assert [s.cfg.d_sae for s in trained] == [256, 128]
    assert trained[0].metadata["token_kinds"] == ["image", "text"]
    first, second = ([x for s, x in fed if s is sae] for sae in trained)
    assert len(first) == len(second) == 30 and len(fed) == 60
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for x in first:
        assert Counter(kind_of[row.numpy().tobytes()] for row in x) == {Kind.IMAGE: 32, Kind.TEXT: 32}
    for sae, before in zip(trained, initial):
        for name in ("W_enc", "b_enc", "W_dec"):
            assert (sae.state_dict()[name] - before[name]).abs().amax() > 1e-4, name
    assert sorted((h["sae"], h["step"]) for h in history) == [(0, 25), (1, 25)]


@pytest.mark.parametrize("recipe", [{}, MATRYOSHKA], ids=["topk", "matryoshka"])
def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, recipe):
    from vlmsae.zoo import tiny_model

    model = tiny_model("llava")
    cfg = dict(FAST, steps=64, checkpoint_every=8)
    train(model, LAYER, batches(model, 6), make_sae(**recipe), out=tmp_path, **cfg)
    good = latest_checkpoint(tmp_path)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    calls = {"n": 0}

    def poison(resid, fwd):
        calls["n"] += 1
        return resid * float("nan") if calls["n"] > 1 else None  # the first refill after resuming

    with vlmsae.attach(model, {(LAYER - 1, "resid_post"): poison}):
        with pytest.raises(vlmsae.NonFiniteError, match=rf"activations of layer {LAYER} at step \d+.*{good}"):
            train(model, LAYER, batches(model, 6), make_sae(**recipe), out=tmp_path, resume=True,
                  **dict(cfg, steps=128, outlier_factor=None))
    assert latest_checkpoint(tmp_path) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_one_readout_cadence_set_on_the_trainer_config():
    """SAETrainerConfig owns sync_every: the run reads out (and checks its inputs for NaN) at the trainers'
    readout steps, so every readout reaches the history."""
    from vlmsae.trainer import SAETrainerConfig
    from vlmsae.zoo import tiny_model

    model = tiny_model("llava")
    history = []
    fast = {k: v for k, v in FAST.items() if k != "sync_every"}
    result = train(model, LAYER, batches(model, 6), make_sae(), trainer_cfg=SAETrainerConfig(sync_every=20),
                   history=history, **dict(fast, steps=60))
    assert [h["step"] for h in history] == [20, 40, 60]
    assert result.history == history and isinstance(result, TrainResult)


def test_lr_and_sync_every_set_twice_must_agree():
    """lr and sync_every belong to SAETrainerConfig; the deprecated OnlineRunConfig fields still work, with a
    DeprecationWarning, and two values that disagree raise a ConfigError naming both."""
    from vlmsae.train import RUN_SYNC_EVERY, trainer_config
    from vlmsae.trainer import SAETrainerConfig

    with pytest.warns(DeprecationWarning, match="SAETrainerConfig"):
        old = OnlineRunConfig(lr=1e-3, sync_every=20)
    assert (trainer_config(old, None, {}).lr, trainer_config(old, None, {}).sync_every) == (1e-3, 20)
    assert trainer_config(old, SAETrainerConfig(lr=1e-3), {}).sync_every == 20  # equal values agree
    assert trainer_config(OnlineRunConfig(), None, {}).sync_every == RUN_SYNC_EVERY == 25
    assert trainer_config(OnlineRunConfig(), None, {"sync_every": 5}).sync_every == 5
    with pytest.raises(vlmsae.ConfigError, match=r"OnlineRunConfig sync_every=20 .* SAETrainerConfig sync_every=7"):
        trainer_config(old, SAETrainerConfig(sync_every=7), {})
    with pytest.raises(vlmsae.ConfigError, match=r"OnlineRunConfig lr=0.001 .* SAETrainerConfig lr=0.002"):
        trainer_config(old, SAETrainerConfig(lr=2e-3), {})
    with pytest.raises(vlmsae.ConfigError, match=r"sync_every=20 disagrees with trainer_cfg's sync_every=7"):
        train(None, LAYER, [], make_sae(), trainer_cfg=SAETrainerConfig(sync_every=7), **FAST | {"sync_every": 20})
    with pytest.warns(DeprecationWarning), pytest.raises(vlmsae.ConfigError, match="sync_every=0"):
        OnlineRunConfig(sync_every=0)


def test_renamed_configs_keep_their_old_names_for_a_release():
    import importlib

    from vlmsae.testbed.models import TestbedModelConfig
    from vlmsae.trainer import SAETrainerConfig

    old_names = [(vlmsae, "TrainConfig", OnlineRunConfig), (vlmsae, "TrainerConfig", SAETrainerConfig),
                 (importlib.import_module("vlmsae.train"), "TrainConfig", OnlineRunConfig),
                 (importlib.import_module("vlmsae.trainer"), "TrainerConfig", SAETrainerConfig),
                 (importlib.import_module("vlmsae.testbed.models"), "TrainConfig", TestbedModelConfig)]
    for module, name, new in old_names:
        with pytest.warns(DeprecationWarning, match=new.__name__):
            assert getattr(module, name) is new
    assert len({OnlineRunConfig, SAETrainerConfig, TestbedModelConfig}) == 3


def test_train_result_keeps_the_old_return_shapes_for_a_release():
    """One return type, TrainResult; used as the old SAE / dict it still works, with a DeprecationWarning."""
    a, b = make_sae(0), make_sae(1)
    one = TrainResult({LAYER: [a]}, [], None, a)
    assert one.sae is a and one.saes == {LAYER: [a]}
    x = torch.randn(3, 64)
    with pytest.warns(DeprecationWarning, match=r"\.sae"):
        assert one.W_dec is a.W_dec
    with pytest.warns(DeprecationWarning):
        assert torch.equal(one(x).recon, a(x).recon)
    many = TrainResult({0: [a], 2: [b]}, [], None, {0: a, 2: b})
    with pytest.warns(DeprecationWarning):
        assert many[2] is b and list(many) == [0, 2] and len(many) == 2 and 0 in many
    with pytest.warns(DeprecationWarning):
        assert dict(many.items()) == {0: a, 2: b}
    with pytest.raises(vlmsae.ConfigError, match="trained 2 SAEs"):
        many.sae


def test_train_from_shards(tmp_path):
    from vlmsae.zoo import tiny_model

    model = tiny_model("llava")
    folder = harvest(model, [0, LAYER], batches(model, 8), tmp_path / "shards", shard_rows=300)
    shards = Shards(folder, chunk_rows=128)
    assert shards.layers == [0, LAYER] and len(shards.manifest["shards"]["1"]) >= 2
    sae = train(None, LAYER, shards, make_sae(), steps=100, **FAST).sae
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
        OnlineRunConfig(batch_size=64, buffer_size=100)
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
