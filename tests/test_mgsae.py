"""MGSAE (issue 15, item 2; Kaushik et al. 2026, arXiv 2601.20028): the group-sparsity identities, its finite
gradient at zero, the training step against a dense reference written from the definitions, the mask shared by a
pair and used in training only, exact resume, the NaN guard, the file round trip and its errors, pairs recorded
from a dual encoder and a VLM, and a run on Shapes-CLIP pairs that learns."""

import json
import math

import pytest
import torch
from conftest import assert_step_equals_dense_step
from safetensors.torch import load_file, save_file

import vlmsae
from vlmsae import MGSAE, MGSAEConfig, MGSAETrainer, metrics, train_mgsae
from vlmsae.errors import ConfigError, NonFiniteError, SAEFileError
from vlmsae.mgsae import group_sparsity
from vlmsae.mgsae_trainer import group_sparsity_at

D_IN, D_SAE, K = 16, 96, 4


@pytest.fixture
def one_thread():
    """Many small steps: one thread is as fast, and does not stall when other jobs hold the second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pairs(n: int, seed: int = 0, d: int = D_IN, n_concepts: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """n pairs of sparse sums of shared concept directions, each side with its own offset and a little noise."""
    g = torch.Generator().manual_seed(seed)
    concepts = torch.nn.functional.normalize(torch.randn(n_concepts, d, generator=torch.Generator().manual_seed(99)), dim=1)
    on = (torch.rand(n, n_concepts, generator=g) < 0.06) * (torch.rand(n, n_concepts, generator=g) + 0.5)
    image = on @ concepts + 0.5 + 0.05 * torch.randn(n, d, generator=g)
    text = on @ concepts - 0.5 + 0.05 * torch.randn(n, d, generator=g)
    return image, text


def float64_mgsae(**fields) -> MGSAE:
    torch.manual_seed(0)
    sae = MGSAE(d_in=D_IN, d_sae=D_SAE, k=K, **fields).double()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.b_pre.normal_(0, 0.1)
    return sae


# --- the penalty ----------------------------------------------------------------------------------------


def test_group_sparsity_identities():
    """Disjoint supports: the sum of the two L1 norms; identical codes: sqrt(2) times the L1 norm."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 64, generator=g, dtype=torch.float64) * (torch.rand(5, 64, generator=g) < 0.3)
    image_side = torch.rand(5, 64, generator=g) < 0.5
    z_image, z_text = z * image_side, z * ~image_side
    torch.testing.assert_close(group_sparsity(z_image, z_text), z_image.abs().sum(-1) + z_text.abs().sum(-1),
                               rtol=1e-15, atol=0)
    torch.testing.assert_close(group_sparsity(z, z), math.sqrt(2) * z.abs().sum(-1), rtol=1e-15, atol=0)
    # one latent: the Euclidean norm of the pair
    assert group_sparsity(torch.tensor([3.0]), torch.tensor([4.0])).item() == 5.0


def test_group_sparsity_gradient_is_finite_where_both_codes_are_zero():
    z_image = torch.tensor([[0.0, 3.0, 0.0, 1.0]], requires_grad=True)
    z_text = torch.tensor([[0.0, 4.0, 2.0, 0.0]], requires_grad=True)
    group_sparsity(z_image, z_text).sum().backward()
    # d/dz_m sqrt(z_image^2 + z_text^2) = z_m / norm where norm > 0; 0 (a subgradient) where both are 0
    assert torch.equal(z_image.grad, torch.tensor([[0.0, 0.6, 0.0, 1.0]]))
    assert torch.equal(z_text.grad, torch.tensor([[0.0, 0.8, 1.0, 0.0]]))


def test_sparse_penalty_equals_the_dense_one_with_its_gradient():
    g = torch.Generator().manual_seed(1)
    n, d_sae, k = 6, 20, 5
    latents = torch.stack([torch.randperm(d_sae, generator=g)[:k].sort().values for _ in range(2 * n)])
    values = torch.rand(2 * n, k, generator=g, dtype=torch.float64).requires_grad_()
    values_dense = values.detach().clone().requires_grad_()
    rows = torch.arange(2 * n).repeat_interleave(k)
    sparse = group_sparsity_at(rows % n, latents.reshape(-1), values.reshape(-1), d_sae)
    codes = torch.zeros(2 * n, d_sae, dtype=torch.float64).index_put((rows, latents.reshape(-1)),
                                                                      values_dense.reshape(-1))
    dense = group_sparsity(codes[:n], codes[n:]).sum()
    sparse.backward()
    dense.backward()
    torch.testing.assert_close(sparse, dense, rtol=1e-14, atol=0)
    torch.testing.assert_close(values.grad, values_dense.grad, rtol=1e-14, atol=0)


# --- the training step ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pair", "batch"])
def test_trainer_step_equals_the_dense_reference(mode):
    """One sparse step (mask on) lands where Adam on the dense loss, written from the definitions, lands."""
    x_image, x_text = (x.double() for x in pairs(24))
    sae, reference = float64_mgsae(mask_mode=mode), float64_mgsae(mask_mode=mode)
    trainer = MGSAETrainer(sae, lr=1e-3, init_from_first_batch=False, sync_every=1, seed=7)
    trainer.step(torch.stack([x_image, x_text]))

    mask = reference.random_mask(24, torch.Generator().manual_seed(7))
    assert mask.shape == ((24, D_SAE) if mode == "pair" else (1, D_SAE)) and mask.any()

    def side(x, m):
        u = x - reference.b_pre[m]
        pre = (u @ reference.W_enc + reference.b_enc).masked_fill(mask, -math.inf)
        top = pre.topk(K, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        return z, z @ reference.W_dec + reference.b_dec[m]

    z_image, recon_image = side(x_image, 0)
    z_text, recon_text = side(x_text, 1)
    penalty = (z_image.pow(2) + z_text.pow(2)).sqrt().sum(1)  # no latent has both codes 0 here: sqrt is safe
    loss = ((x_image - recon_image).pow(2).sum(1) + (x_text - recon_text).pow(2).sum(1)
            + reference.cfg.group_coefficient * penalty).mean()
    assert torch.allclose(loss, reference.pair_loss(x_image, x_text, mask), rtol=1e-12)
    assert_step_equals_dense_step(sae, reference, loss)
    assert trainer.history[-1].loss == pytest.approx(loss.item(), rel=1e-9)
    # FVU within each modality: squared error over the sum of the two variances
    se = (x_image - recon_image).pow(2).sum() + (x_text - recon_text).pow(2).sum()
    tv = metrics.total_variance(x_image) + metrics.total_variance(x_text)
    assert trainer.history[-1].fvu == pytest.approx((se / tv).item(), rel=1e-6)


def test_mask_is_shared_by_a_pair_and_used_in_training_only():
    x_image, x_text = pairs(32)
    sae = MGSAE(d_in=D_IN, d_sae=D_SAE, k=K, mask_probability=0.9)  # most latents masked: avoiding them is no accident
    trainer = MGSAETrainer(sae, init_from_first_batch=False)
    seen = {}
    draw, encode_selected = sae.random_mask, trainer._encode_selected

    def spy_draw(*args):
        seen["mask"] = draw(*args)
        return seen["mask"]

    def spy_encode(u, chosen):
        seen["code"] = chosen.code
        return encode_selected(u, chosen)

    sae.random_mask, trainer._encode_selected = spy_draw, spy_encode
    trainer.step(torch.stack([x_image, x_text]))
    mask, code = seen["mask"], seen["code"]
    assert mask.shape == (32, D_SAE)
    pair = code.rows % 32
    assert not mask[pair, code.cols].any()  # neither code of pair i holds a latent masked for pair i
    assert mask[(pair + 1) % 32, code.cols].any()  # ... while other pairs' masks differ: it is pair i's own
    assert code.rows.max() == 63  # the text rows were selected too

    sae.eval()
    reference = ((x_image - sae.b_pre[0]) @ sae.W_enc + sae.b_enc).topk(K, dim=1)
    z = sae.encode(x_image, "image")
    assert torch.equal(z, sae.encode(x_image, "image"))  # eval: deterministic, no mask
    assert torch.equal(z, torch.zeros_like(z).scatter(1, reference.indices, reference.values.relu()))


# --- exact resume and the NaN guard ----------------------------------------------------------------------

RUN = dict(steps=20, batch_size=48, seed=3, lr=3e-3, sync_every=3, progress=False)


def fresh(seed: int = 0) -> MGSAE:
    torch.manual_seed(seed)
    return MGSAE(d_in=D_IN, d_sae=D_SAE, k=K, dead_tokens=300, aux_k=8)  # latents die: AuxK runs


def test_interrupted_run_resumes_bitwise(tmp_path, monkeypatch):
    x_image, x_text = pairs(200)
    ref = train_mgsae(x_image, x_text, fresh(), out=tmp_path / "ref", **RUN)
    assert ref.aux_active and any(m.aux_loss > 0 for m in ref.history)

    class Interrupt(Exception):
        pass

    step = MGSAETrainer.step

    def flaky(self, x, k=None):
        if self.n_steps == 11:  # after the checkpoint of step 8, inside a metric window
            raise Interrupt
        step(self, x, k)

    monkeypatch.setattr(MGSAETrainer, "step", flaky)
    with pytest.raises(Interrupt):
        train_mgsae(x_image, x_text, fresh(), out=tmp_path / "run", checkpoint_every=4, **RUN)
    monkeypatch.setattr(MGSAETrainer, "step", step)
    assert json.loads((tmp_path / "run/checkpoint/trainer.json").read_text())["n_steps"] == 8
    resumed = train_mgsae(x_image, x_text, fresh(seed=123), out=tmp_path / "run", resume=True, **RUN)
    for name, tensor in ref.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], tensor), name
    assert resumed.history == ref.history
    loaded = MGSAE.load(tmp_path / "run/sae")
    for name, tensor in ref.sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with pytest.raises(ConfigError, match=r"'seed': 3\}, this one has .*'seed': 4\}; resume with the same"):
        train_mgsae(x_image, x_text, fresh(), out=tmp_path / "run", resume=True, **dict(RUN, seed=4))


def test_nan_pairs_are_a_typed_error_that_changes_nothing(tmp_path):
    x_image, x_text = pairs(200)
    train_mgsae(x_image, x_text, fresh(), out=tmp_path, **dict(RUN, steps=6))
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}
    sae = fresh()
    state = {name: t.clone() for name, t in sae.state_dict().items()}
    x_text = x_text.clone()
    x_text[17, 3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"1 pairs hold NaN or Inf \(rows \[17\]\)"):
        train_mgsae(x_image, x_text, sae, out=tmp_path, resume=True, **RUN)
    assert all(torch.equal(sae.state_dict()[name], t) for name, t in state.items())
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()} == before


def test_nan_weights_never_become_the_checkpoint(tmp_path, monkeypatch):
    x_image, x_text = pairs(200)
    train_mgsae(x_image, x_text, fresh(), out=tmp_path, **dict(RUN, steps=6))
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}
    step = MGSAETrainer.step

    def poisoned(self, x, k=None):
        step(self, x, k)
        with torch.no_grad():
            self.sae.b_enc[0] = float("nan")

    monkeypatch.setattr(MGSAETrainer, "step", poisoned)
    with pytest.raises(NonFiniteError, match=r"weights by step \d+; last good checkpoint: .*checkpoint"):
        train_mgsae(x_image, x_text, fresh(), out=tmp_path, resume=True, checkpoint_every=2,
                    **dict(RUN, sync_every=100))
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()} == before


def test_a_nan_loss_stops_the_trainer_at_its_readout():
    x_image, x_text = pairs(32)
    trainer = MGSAETrainer(fresh(), sync_every=2)
    trainer.step(torch.stack([x_image, x_text]))
    x_image = x_image.clone()
    x_image[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="steps 1..2; check the activations"):
        trainer.step(torch.stack([x_image, x_text]))


# --- config and files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"mask_probability": 1.0}, r"mask_probability=1.0 must be in \[0, 1\)"),
    ({"group_coefficient": -1}, r"group_coefficient=-1 must be a finite number >= 0"),
    ({"mask_mode": "token"}, r"mask_mode='token' is unknown; use one of pair, batch"),
    ({"architecture": "topk"}, r"architecture='topk' is unknown; use one of mgsae"),
    ({"matryoshka_widths": (8, 96)}, r"matryoshka_widths is for the topk architectures"),
    ({"k": 97}, r"k=97 must be in 1..d_sae=96"),
])
def test_config_errors_name_the_value_and_the_fix(fields, message):
    with pytest.raises(ConfigError, match=message):
        MGSAEConfig(d_in=D_IN, d_sae=D_SAE, **fields)


def test_each_class_takes_its_own_config():
    with pytest.raises(ConfigError, match="an MGSAE takes an MGSAEConfig"):
        vlmsae.SAEConfig(d_in=8, architecture="mgsae")
    with pytest.raises(ConfigError, match="SAE is built from a SAEConfig, not a MGSAEConfig; pass it to vlmsae.MGSAE"):
        vlmsae.SAE(MGSAEConfig(d_in=8))
    with pytest.raises(ConfigError, match="MGSAETrainer trains an MGSAE, not a SAE"):
        MGSAETrainer(vlmsae.SAE(d_in=8))
    with pytest.raises(ConfigError, match="modality='audio' must be one of 'image', 'text'"):
        MGSAE(d_in=8).encode(torch.zeros(8), "audio")


def trained_like() -> MGSAE:
    sae = MGSAE(d_in=D_IN, d_sae=D_SAE, k=K, normalize_activations=True, mask_mode="batch",
                metadata={"hook_name": "hook_image_embeds"})
    x_image, x_text = pairs(64)
    sae.init_from_batch(torch.stack([x_image, x_text]) * 37)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert float(sae.act_scale) != 1.0 and not torch.equal(sae.b_pre, sae.b_dec)
    return sae


def test_save_load_round_trip(tmp_path):
    sae = trained_like()
    sae.save(tmp_path / "m")
    loaded = MGSAE.load(tmp_path / "m")
    assert isinstance(loaded, MGSAE) and not loaded.training and loaded.cfg == sae.cfg
    for name, t in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    cfg = json.loads((tmp_path / "m/cfg.json").read_text())
    assert cfg["architecture"] == "mgsae" and cfg["vlmsae"]["config"]["mask_mode"] == "batch"
    x = torch.randn(5, D_IN) * 37
    sae.eval()
    for modality in ("image", "text"):
        assert torch.equal(sae.encode(x, modality), loaded.encode(x, modality))
        assert torch.equal(sae(x, modality).recon, loaded(x, modality).recon)


def test_file_errors(tmp_path):
    trained_like().save(tmp_path / "m")
    with pytest.raises(SAEFileError, match=r"architecture 'mgsae'; open it with vlmsae.MGSAE.load"):
        vlmsae.SAE.load(tmp_path / "m")
    vlmsae.SAE(d_in=D_IN, d_sae=D_SAE, k=K).save(tmp_path / "plain")
    with pytest.raises(SAEFileError, match=r"architecture 'topk'; open it with vlmsae.SAE.load"):
        MGSAE.load(tmp_path / "plain")

    weights = tmp_path / "m/sae_weights.safetensors"
    good_weights, good_cfg = weights.read_bytes(), (tmp_path / "m/cfg.json").read_text()
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k != "b_pre"}, weights)
    with pytest.raises(SAEFileError, match=r"missing \['b_pre'\]"):
        MGSAE.load(tmp_path / "m")
    save_file({**tensors, "b_pre": tensors["b_pre"][0]}, weights)
    with pytest.raises(SAEFileError, match=r"key 'b_pre' has shape \[16\], config says \[2, 16\]"):
        MGSAE.load(tmp_path / "m")
    weights.write_bytes(good_weights[:100])
    with pytest.raises(SAEFileError, match="not a readable safetensors file"):
        MGSAE.load(tmp_path / "m")
    weights.write_bytes(good_weights)
    cfg = json.loads(good_cfg)
    for broken, message in [({**cfg, "vlmsae": None}, r"architecture 'mgsae' needs the key 'vlmsae'"),
                            ({**cfg, "vlmsae": {**cfg["vlmsae"], "config": {**cfg["vlmsae"]["config"],
                                                                           "mask_probability": "high"}}},
                             r"key 'vlmsae.config.mask_probability' = 'high' has the wrong type"),
                            ({**cfg, "vlmsae": {**cfg["vlmsae"], "config": {**cfg["vlmsae"]["config"],
                                                                           "mask_mode": "token"}}},
                             r"mask_mode='token' is unknown")]:
        (tmp_path / "m/cfg.json").write_text(json.dumps(broken))
        with pytest.raises(SAEFileError, match=message):
            MGSAE.load(tmp_path / "m")


def test_to_sae_is_the_modality_as_a_plain_sae():
    sae = trained_like().eval()
    x = torch.randn(9, D_IN) * 37
    for modality in ("image", "text"):
        plain = sae.to_sae(modality)
        assert type(plain) is vlmsae.SAE and plain.metadata["modality"] == modality
        torch.testing.assert_close(plain.encode(x), sae.encode(x, modality), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain(x).recon, sae(x, modality).recon, rtol=1e-5, atol=1e-4)


def test_entry_points_take_a_modality_of_an_mgsae_not_the_mgsae():
    from vlmsae.zoo import tiny_inputs, tiny_model

    model = tiny_model("clip")
    width = vlmsae.layers(model).width("image_embeds")
    sae = MGSAE(d_in=width, d_sae=4 * width, k=4).eval()
    inputs = tiny_inputs(model, 2)
    for enter in (lambda: vlmsae.splice(model, "hook_image_embeds", sae),
                  lambda: vlmsae.ablate(model, "hook_image_embeds", sae, [0]),
                  lambda: vlmsae.steer(model, "hook_image_embeds", sae, {0: 1.0})):
        with pytest.raises(ConfigError, match=r"sae.to_sae\('image'\)"):
            with enter():
                pass
    with vlmsae.splice(model, "hook_image_embeds", sae.to_sae("image")):
        model(**inputs)


# --- pairs from models, and a run that learns ----------------------------------------------------------


def test_embedding_pairs_are_the_dual_encoders_features():
    from vlmsae.zoo import tiny_inputs, tiny_model

    model = tiny_model("clip")
    batches = [tiny_inputs(model, 4, seed=s) for s in range(2)]
    x_image, x_text = vlmsae.embedding_pairs(model, batches)

    def pooled(out):  # a tensor in transformers 4, an output whose pooler_output it is in 5
        return getattr(out, "pooler_output", out)

    with torch.no_grad():
        want_image = torch.cat([pooled(model.get_image_features(pixel_values=b["pixel_values"])) for b in batches])
        want_text = torch.cat([pooled(model.get_text_features(input_ids=b["input_ids"],
                                                              attention_mask=b["attention_mask"])) for b in batches])
    assert torch.equal(x_image, want_image) and torch.equal(x_text, want_text)


def test_pooled_pairs_are_the_means_of_image_and_text_tokens():
    from vlmsae.zoo import FIRST_TEXT_ID, tiny_inputs, tiny_model

    model = tiny_model("llava")
    inputs = tiny_inputs(model, 3)
    x_image, x_text = vlmsae.pooled_pairs(model, "blocks.1.hook_resid_post", [inputs])
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[2]
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    for i in range(3):
        torch.testing.assert_close(x_image[i], hidden[i][ids[i] == model.config.image_token_index].mean(0))
        torch.testing.assert_close(x_text[i], hidden[i][(ids[i] >= FIRST_TEXT_ID) & real[i]].mean(0))
    with pytest.raises(ConfigError, match="no sample of data has both image and text positions"):
        vlmsae.pooled_pairs(tiny_model("vit-gpt2"), 1, [tiny_inputs(tiny_model("vit-gpt2"), 2)])


def shapes_clip_pairs(n: int, seed: int):
    from vlmsae.testbed import clip, shapes

    model, tokenizer = clip.load_clip()
    batches = (clip.clip_inputs(shapes.make_samples(128, seed + i), tokenizer) for i in range(n // 128))
    return vlmsae.embedding_pairs(model, batches)


def test_mgsae_learns_shapes_clip_pairs(one_thread):
    x_image, x_text = shapes_clip_pairs(2048, seed=0)
    test_image, test_text = shapes_clip_pairs(256, seed=10_000)
    torch.manual_seed(0)
    sae = MGSAE(d_in=x_image.shape[1], d_sae=512, k=8)
    trainer = train_mgsae(x_image, x_text, sae, steps=400, batch_size=256, lr=1e-3, sync_every=50,
                          progress=False)
    first, last = trainer.history[0], trainer.history[-1]
    print("\nMGSAE on Shapes-CLIP pairs, readouts:", [(m.step, round(m.fvu, 3), round(m.dead_fraction, 2))
                                                     for m in trainer.history])
    sae.eval()
    fvu = {m: metrics.fvu(x, sae(x, m).recon).item() for m, x in (("image", test_image), ("text", test_text))}
    print("held-out FVU:", fvu)
    assert last.fvu < first.fvu / 2 and max(fvu.values()) < 0.15, (fvu, first, last)
