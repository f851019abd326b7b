"""k_per_kind (issue 15): a TopK SAE that keeps a k per token kind, image and text.

References are written out here: each row's top k taken one row at a time with its kind's k, and a dense autograd
step from the definitions (MSE of the dense decode, Adam, unit-norm decoder)."""

import json

import pytest
import torch
from conftest import assert_step_equals_dense_step

import vlmsae
from vlmsae import SAE, Kind, metrics
from vlmsae.errors import ConfigError, SAEFileError
from vlmsae.train import train
from vlmsae.trainer import SAETrainer
from vlmsae.zoo import tiny_inputs, tiny_model

K = {"image": 2, "text": 6}


def mixed_kinds(n: int, seed: int = 0) -> torch.Tensor:
    """(n,) kinds: image, text and generated (read as text) rows, interleaved."""
    g = torch.Generator().manual_seed(seed)
    choices = torch.tensor([int(Kind.IMAGE), int(Kind.TEXT), int(Kind.GENERATED)], dtype=torch.int8)
    return choices[torch.randint(0, 3, (n,), generator=g)]


def make_sae(dtype=torch.float64, **fields) -> SAE:
    torch.manual_seed(0)
    sae = SAE(d_in=16, d_sae=64, k=4, k_per_kind=fields.pop("k_per_kind", K), **fields).to(dtype)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def by_hand(sae: SAE, x: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """(n, d_sae): each row's top k of its pre-activations, ReLU'd, k from the kind (image: K['image'], else text)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    out = torch.zeros_like(pre)
    for i, (row, kind) in enumerate(zip(pre, kinds.tolist())):
        k = K["image"] if kind == Kind.IMAGE else K["text"]
        values, index = row.topk(k)
        out[i, index] = values.relu()
    return out


def test_encode_keeps_each_kinds_k():
    sae = make_sae().eval()
    x, kinds = torch.randn(3, 40, 16, dtype=torch.float64), mixed_kinds(120).view(3, 40)
    latents = sae.encode(x, kinds)
    torch.testing.assert_close(latents, by_hand(sae, x.view(-1, 16), kinds.view(-1)).view(3, 40, 64))
    l0 = (latents != 0).sum(-1)
    assert set(l0[kinds == Kind.IMAGE].tolist()) == {2} and set(l0[kinds != Kind.IMAGE].tolist()) == {6}
    out = sae(x, kinds)
    torch.testing.assert_close(out.latents, latents)
    with pytest.raises(ConfigError, match=r"k_per_kind=.*pass kinds="):
        sae.encode(x)


def test_a_kind_left_out_keeps_k_and_bad_values_are_refused():
    sae = make_sae(k_per_kind={"image": 3}).eval()
    x, kinds = torch.randn(50, 16, dtype=torch.float64), mixed_kinds(50)
    l0 = (sae.encode(x, kinds) != 0).sum(-1)
    assert set(l0[kinds == Kind.IMAGE].tolist()) == {3} and set(l0[kinds != Kind.IMAGE].tolist()) == {4}
    for fields, match in ((dict(k_per_kind={"video": 3}), "keys 'image' and/or 'text'"),
                          (dict(k_per_kind={"image": 0}), r"k_per_kind\['image'\]=0"),
                          (dict(k_per_kind={"text": 65}), r"k_per_kind\['text'\]=65 must be in 1..d_sae=64"),
                          (dict(k_per_kind=K, architecture="batchtopk"), "architecture='batchtopk'"),
                          (dict(k_per_kind=K, architecture="relu"), "architecture='relu'")):
        with pytest.raises(ConfigError, match=match):
            SAE(d_in=16, d_sae=64, k=4, **fields)


def test_a_trainer_step_equals_the_dense_autograd_step():
    """No dead latents (AuxK off): the sparse step with a k per row lands where autograd on sae(x, kinds) lands."""
    x, kinds = torch.randn(48, 16, dtype=torch.float64), mixed_kinds(48, seed=1)
    sae, reference = make_sae(aux_k=0), make_sae(aux_k=0)
    trainer = SAETrainer(sae, lr=1e-3, init_from_first_batch=False, sync_every=1)
    trainer.step(x, kinds=kinds)

    out = reference.train()(x, kinds)
    torch.testing.assert_close(out.latents, by_hand(reference, x, kinds))
    loss = metrics.mse(x, out.recon)
    assert_step_equals_dense_step(sae, reference, loss)
    readout = trainer.history[-1]
    assert readout.loss == pytest.approx(loss.item(), rel=1e-9)
    n_image = int((kinds == Kind.IMAGE).sum())
    assert readout.l0 == pytest.approx((2 * n_image + 6 * (48 - n_image)) / 48)
    with pytest.raises(ConfigError, match="pass kinds="):
        trainer.step(x)


def test_an_annealed_k_scales_each_kinds_k():
    sae = make_sae(k_per_kind={"image": 4, "text": 12})
    assert sae.cfg.kind_k() == (12, 4) and sae.cfg.kind_k(8) == (24, 8) and sae.cfg.kind_k(1) == (3, 1)
    x, kinds = torch.randn(30, 16, dtype=torch.float64), mixed_kinds(30)
    trainer = SAETrainer(sae, lr=1e-3, init_from_first_batch=False, sync_every=1)
    trainer.step(x, k=8, kinds=kinds)  # twice the SAE's k of 4
    n_image = int((kinds == Kind.IMAGE).sum())
    assert trainer.history[-1].l0 == pytest.approx((8 * n_image + 24 * (30 - n_image)) / 30)


def test_the_file_round_trips_and_saelens_is_kept_out(tmp_path):
    sae = make_sae(dtype=torch.float32).eval()
    sae.save(tmp_path / "sae")
    raw = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert raw["architecture"] == "kinds_topk" and raw["vlmsae"]["config"]["k_per_kind"] == K
    loaded = SAE.load(tmp_path / "sae")
    assert loaded.cfg.k_per_kind == K
    x, kinds = torch.randn(20, 16), mixed_kinds(20)
    torch.testing.assert_close(loaded.encode(x, kinds), sae.encode(x, kinds))
    raw["vlmsae"]["config"]["k_per_kind"] = None  # the prefix says kinds, the config none
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(SAEFileError, match="disagree with 'architecture'"):
        SAE.load(tmp_path / "sae")
    raw["vlmsae"]["config"]["k_per_kind"] = {"image": "two"}
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(SAEFileError, match="must be an object of integers"):
        SAE.load(tmp_path / "sae")


def test_online_training_and_splice_keep_each_kinds_k():
    """vlmsae.train passes the buffer's kinds; splice passes the model's; L0 per kind is each kind's k."""
    model = tiny_model("llava")
    data = [tiny_inputs(model, 6, seed=s) for s in range(6)]
    torch.manual_seed(0)
    sae = SAE(d_in=64, d_sae=256, k=8, k_per_kind={"image": 4, "text": 12})
    trained = train(model, 1, data, sae, steps=20, batch_size=64, buffer_size=256, sync_every=10,
                    warmup_steps=2, progress=False).sae
    stats = vlmsae.evaluate(model, 1, trained, data[:1]).loc["all"]
    assert stats["l0_image"] == pytest.approx(4) and stats["l0_text"] == pytest.approx(12)
