"""normalize_per_kind (issue 15): a mean and a scale per token kind (image / text), from the first batch.

References are written out here: per-kind statistics from the data and the kinds the test knows (the zoo's token
ids), the SAE's math by hand, logits from a plain PyTorch hook."""

import json
import math

import pytest
import torch

import vlmsae
from vlmsae import SAE, Kind, zoo
from vlmsae.errors import ConfigError, NonFiniteError, SAEFileError
from vlmsae.train import latest_checkpoint, train
from vlmsae.trainer import SAETrainer
from vlmsae.zoo import tiny_inputs, tiny_model

from test_interventions import replace_layer_output

LAYER = 1
FAST = dict(batch_size=64, buffer_size=512, sync_every=25, warmup_steps=10, k_start=32, progress=False)


def make_sae(seed=0, d_in=64, **fields):
    torch.manual_seed(seed)
    fields.setdefault("normalize_per_kind", True)
    return SAE(d_in=d_in, d_sae=256, k=8, **fields)


def batches(model, n, seed=0):
    return [tiny_inputs(model, 6, seed=seed + s, padding="left" if s % 2 else "right") for s in range(n)]


def two_kinds(n=300, d=64, seed=0):
    """Rows of two kinds with far apart means and norms: image rows ~ 40 + 30 N(0, 1), text rows ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    kinds = torch.full((n,), int(Kind.TEXT), dtype=torch.int8)
    kinds[: 2 * n // 3] = int(Kind.IMAGE)
    kinds[-5:] = int(Kind.GENERATED)  # read as text
    x = torch.randn(n, d, generator=g)
    image = kinds == Kind.IMAGE
    x[image] = 40 + 30 * x[image]
    return x, kinds


def stats_by_hand(x, rows):
    """(mean, scale) of the rows ``rows`` (bool) of x: the mean, and the power of two nearest sqrt(d) / mean norm."""
    sel = x[rows].double()
    mean = sel.mean(0)
    scale = 2.0 ** round(math.log2(math.sqrt(x.shape[1]) / (sel - mean).norm(dim=1).mean().item()))
    return mean.float(), scale


def by_hand(sae, x, image):
    """The per-kind TopK SAE written out: (reconstruction in the model's units, latents); ``image`` (...) bool."""
    W_enc, b_enc, W_dec, b_dec = (t.detach() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    mean = torch.where(image[..., None], sae.kind_mean[1], sae.kind_mean[0])
    scale = torch.where(image, sae.kind_scale[1], sae.kind_scale[0])[..., None]
    pre = ((x - mean) * scale - b_dec) @ W_enc + b_enc
    top = pre.topk(sae.cfg.k, dim=-1)
    latents = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return (latents @ W_dec + b_dec) / scale + mean, latents


def test_first_batch_sets_each_kinds_mean_and_scale_and_decode_returns_model_units():
    x, kinds = two_kinds()
    sae = make_sae()
    SAETrainer(sae, lr=1e-12).step(x, kinds=kinds)  # the trainer initialises from its first batch, with its kinds
    image = kinds == Kind.IMAGE
    for row, rows in ((0, ~image), (1, image)):  # generated rows count as text
        mean, scale = stats_by_hand(x, rows)
        torch.testing.assert_close(sae.kind_mean[row], mean, rtol=1e-5, atol=1e-4)
        assert sae.kind_scale[row].item() == scale
    assert sae.kind_scale[1] < sae.kind_scale[0]  # the image rows are wider
    sae.eval()
    recon_ref, latents_ref = by_hand(sae, x, image)
    latents = sae.encode(x, kinds)
    torch.testing.assert_close(latents, latents_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(latents, kinds), recon_ref, rtol=1e-5, atol=1e-4)
    out = sae(x, kinds)
    assert torch.equal(out.recon, sae.decode(sae.encode(x, kinds), kinds)) and torch.equal(out.latents, latents)


def test_a_kind_missing_from_the_first_batch_takes_the_whole_batch():
    x, kinds = two_kinds()
    kinds[:] = int(Kind.IMAGE)  # no text row
    sae = make_sae()
    sae.init_from_batch(x, kinds)
    mean, scale = stats_by_hand(x, torch.ones(len(x), dtype=torch.bool))
    for row in (0, 1):
        torch.testing.assert_close(sae.kind_mean[row], mean, rtol=1e-5, atol=1e-4)
        assert sae.kind_scale[row].item() == scale


def test_without_kinds_a_typed_error_names_the_fix_and_without_the_option_kinds_change_nothing():
    x, kinds = two_kinds(n=12)
    sae = make_sae().eval()
    for call in (lambda: sae(x), lambda: sae.encode(x), lambda: sae.decode(torch.zeros(12, 256)),
                 lambda: vlmsae.reconstruct(x, sae), lambda: SAETrainer(make_sae()).step(x)):
        with pytest.raises(ConfigError, match=r"normalize_per_kind=True\): pass kinds="):
            call()
    with pytest.raises(ConfigError, match=r"kinds has shape \(3, 4\); it must be the inputs' leading shape \(12,\)"):
        sae(x, kinds.view(3, 4))
    plain = make_sae(normalize_per_kind=False).eval()
    assert torch.equal(plain(x, kinds).recon, plain(x).recon)
    with pytest.raises(ConfigError, match="replaces normalize_activations"):
        make_sae(normalize_activations=True)


def llava_with_kind_sae():
    """The tiny LLaVA, inputs without padding, and a per-kind SAE initialised on its layer's rows."""
    model = tiny_model("llava")
    inputs = tiny_inputs(model, 2, padding=None)
    with torch.no_grad(), vlmsae.record(model, [LAYER]) as rec:
        model(**inputs)
    sae = make_sae()
    sae.init_from_batch(rec[LAYER], rec.kinds(LAYER))
    with torch.no_grad():  # encoder and decoder biases away from their initial values
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    return model, inputs, sae.eval()


def logits_with(model, inputs, fn):
    """Logits with the output residual r of decoder layer LAYER replaced by fn(r) in a plain PyTorch hook."""
    with replace_layer_output(model, LAYER, fn), torch.no_grad():
        return model(**inputs).logits


def test_splice_keeps_clean_logits_with_the_error_term_and_reconstructs_in_model_units_without():
    model, inputs, sae = llava_with_kind_sae()
    image = inputs["input_ids"] == zoo.IMAGE  # the kinds, from the zoo's token ids
    assert image.any() and (~image).any()
    with torch.no_grad():
        clean = model(**inputs).logits
    with vlmsae.splice(model, LAYER, sae, use_error_term=True):
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, clean)
    with vlmsae.splice(model, LAYER, sae) as s:
        with torch.no_grad():
            spliced = model(**inputs).logits
    reference = logits_with(model, inputs, lambda r: by_hand(sae, r, image)[0])
    torch.testing.assert_close(spliced, reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(spliced, clean, atol=1e-3)
    stats = s.stats()
    assert stats.loc["image", "fvu"] > 0 and stats.loc["text", "fvu"] > 0
    # ablate: only the latent's own decoder row moves the residual, at each position's kind's scale
    with vlmsae.ablate(model, LAYER, sae, [3]):
        with torch.no_grad():
            ablated = model(**inputs).logits

    def ablate_by_hand(r):
        _, latents = by_hand(sae, r, image)
        scale = torch.where(image, sae.kind_scale[1], sae.kind_scale[0])[..., None]
        return r - latents[..., 3:4] * sae.W_dec[3].detach() / scale

    torch.testing.assert_close(ablated, logits_with(model, inputs, ablate_by_hand), rtol=1e-4, atol=1e-4)
    # steer: strength * W_dec[i] in the model's units of each position's kind
    with vlmsae.steer(model, LAYER, sae, {5: 4.0}) as vector:
        with torch.no_grad():
            steered = model(**inputs).logits
    torch.testing.assert_close(vector, 4.0 * sae.W_dec[5].detach() / sae.kind_scale[0])
    by_kind = lambda r: r + 4.0 * sae.W_dec[5].detach() / torch.where(  # noqa: E731
        image, sae.kind_scale[1], sae.kind_scale[0])[..., None]
    torch.testing.assert_close(steered, logits_with(model, inputs, by_kind), rtol=1e-4, atol=1e-4)


def test_online_run_passes_the_buffer_kinds_trains_and_the_saved_sae_round_trips(tmp_path, monkeypatch):
    model = tiny_model("llava")
    data = batches(model, 8)
    kind_of = {}  # every residual row -> its kind, from output_hidden_states and the token ids
    for batch in data:
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states[LAYER + 1]
        attended = batch["attention_mask"].bool()
        image = batch["input_ids"] == zoo.IMAGE
        for row, is_image in zip(hidden[attended], image[attended]):
            kind_of[row.numpy().tobytes()] = bool(is_image)
    first = {}
    original = SAETrainer.step

    def step(self, x, k=None, kinds=None):
        first.setdefault("x", x.detach().clone())
        first.setdefault("kinds", kinds.clone())
        return original(self, x, k=k, kinds=kinds)

    monkeypatch.setattr(SAETrainer, "step", step)
    history = []
    sae = train(model, LAYER, data, make_sae(), steps=100, out=tmp_path, history=history, **FAST).sae
    x, kinds = first["x"], first["kinds"]
    image = torch.tensor([kind_of[row.numpy().tobytes()] for row in x])
    assert torch.equal(kinds == Kind.IMAGE, image) and image.any() and (~image).any()
    for row, rows in ((0, ~image), (1, image)):  # initialised from the first batch, with the buffer's kinds
        mean, scale = stats_by_hand(x, rows)
        torch.testing.assert_close(sae.kind_mean[row], mean, rtol=1e-5, atol=1e-4)
        assert sae.kind_scale[row].item() == scale
    assert history[-1]["fvu"] < 0.8 * history[0]["fvu"]
    assert history[-1]["fvu_text"] is not None and history[-1]["fvu_image"] is not None
    raw = json.loads((tmp_path / f"L{LAYER}" / "cfg.json").read_text())
    assert raw["architecture"] == "kinds_topk" and raw["vlmsae"]["config"]["normalize_per_kind"] is True
    loaded = SAE.load(tmp_path / f"L{LAYER}")
    assert loaded.cfg.normalize_per_kind
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(loaded(x, kinds).recon, sae(x, kinds).recon)
    # a file that would read silently wrong is refused: the mark without the option, the option without the mark,
    # the mark without vlmsae's section
    for change, match in ((lambda r: r["vlmsae"]["config"].update(normalize_per_kind=False), "disagree with"),
                          (lambda r: r.update(architecture="topk"), "disagree with"),
                          (lambda r: r.pop("vlmsae"), "needs the key 'vlmsae'")):
        edited = json.loads(json.dumps(raw))
        change(edited)
        (tmp_path / f"L{LAYER}" / "cfg.json").write_text(json.dumps(edited))
        with pytest.raises(SAEFileError, match=match):
            SAE.load(tmp_path / f"L{LAYER}")


def test_interrupt_resume_equals_uninterrupted(tmp_path):
    model = tiny_model("llava")
    data = batches(model, 8)
    cfg = dict(FAST, steps=50, checkpoint_every=16)  # readouts at 25 and 50
    ref_history, resumed_history = [], []
    ref = train(model, LAYER, data, make_sae(), out=tmp_path / "ref", history=ref_history, **cfg).sae

    class Interrupt(Exception):
        pass

    def flaky():
        for i, b in enumerate(data * 100):
            if i == 20:
                raise Interrupt
            yield b

    class Flaky:
        def __iter__(self):
            return flaky()

    with pytest.raises(Interrupt):
        train(model, LAYER, Flaky(), make_sae(), out=tmp_path / "run", **cfg)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and 0 < json.loads((ckpt / "state.json").read_text())["step"] < 50
    resumed = train(model, LAYER, data, make_sae(seed=123), out=tmp_path / "run", resume=True,
                    history=resumed_history, **cfg).sae
    for name, tensor in ref.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert resumed_history[-1] == ref_history[-1]


def test_nan_in_the_activations_stops_training():
    x, kinds = two_kinds(n=64)
    trainer = SAETrainer(make_sae(), sync_every=2)
    trainer.step(x, kinds=kinds)
    x[3, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="training loss is nan"):
        trainer.step(x, kinds=kinds)
    model = tiny_model("llava")

    def poison(resid, fwd):
        return resid * float("nan")

    with vlmsae.attach(model, {(LAYER - 1, "resid_post"): poison}):
        with pytest.raises(NonFiniteError, match=rf"activations of layer {LAYER} at step 1"):
            train(model, LAYER, batches(model, 6), make_sae(), steps=8, **dict(FAST, outlier_factor=None))


def sparse_rows(n, d, kind, seed):
    """Rows of one kind: 4 of 64 directions of a kind's own dictionary; image rows 100x wider, far off the origin."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(64, d, generator=torch.Generator().manual_seed(kind)), dim=1)
    codes = torch.zeros(n, 64)
    codes.scatter_(1, torch.rand(n, 64, generator=g).topk(4, dim=1).indices, torch.rand(n, 4, generator=g) + 0.5)
    x = codes @ dictionary
    return 100 * x + 300 if kind == Kind.IMAGE else x


def test_per_kind_normalisation_fits_text_rows_better_at_equal_steps():
    """Image rows 100x wider than text rows and far off the origin: one normalisation fits the image rows and leaves
    the text rows' variance unexplained; per-kind normalisation fits both (per-kind FVU, measured here)."""
    d, n = 32, 512
    fvu_text = {}
    for per_kind in (False, True):
        sae = make_sae(d_in=d, normalize_per_kind=per_kind, normalize_activations=not per_kind)
        trainer = SAETrainer(sae, lr=3e-3)
        for step in range(150):
            x = torch.cat([sparse_rows(3 * n // 4, d, Kind.IMAGE, step), sparse_rows(n // 4, d, Kind.TEXT, step)])
            kinds = torch.cat([torch.full((3 * n // 4,), int(Kind.IMAGE)), torch.full((n // 4,), int(Kind.TEXT))])
            trainer.step(x, kinds=kinds)
        x_text = sparse_rows(n, d, Kind.TEXT, 10_000)
        with torch.no_grad():
            recon = sae.eval()(x_text, torch.full((n,), int(Kind.TEXT))).recon
        fvu_text[per_kind] = ((recon - x_text).pow(2).sum() / (x_text - x_text.mean(0)).pow(2).sum()).item()
    print(f"text-row FVU after 150 steps: one normalisation {fvu_text[False]:.3f}, per kind {fvu_text[True]:.3f}")
    assert fvu_text[True] < 0.5 * fvu_text[False]


def test_the_training_loss_is_the_mse_in_each_kinds_normalised_units():
    """The step's loss: the per-element MSE between (x - mean) * scale and the decode of the same units, the kinds'
    statistics set by the first batch (written out by hand; AuxK off, no latent dead yet)."""
    x, kinds = two_kinds()
    sae = make_sae()
    trainer = SAETrainer(sae, lr=1e-12, compute_dtype="float32")  # the reference selects in float32
    trainer.step(x, kinds=kinds)  # sets the statistics
    image = kinds == Kind.IMAGE
    with torch.no_grad():
        recon, _ = by_hand(sae, x, image)
        scale = torch.where(image, sae.kind_scale[1], sae.kind_scale[0])[..., None]
        mean = torch.where(image[..., None], sae.kind_mean[1], sae.kind_mean[0])
        want = ((x - mean) * scale - (recon - mean) * scale).pow(2).mean()
        got = trainer._loss(x, None, kinds.long()).loss
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
