"""Vision-tower and projector sites (issue 14, item 2): ``vision.blocks.L.hook_resid_pre/post`` and
``vision.hook_proj_out`` on every VLM family, recorded, spliced, steered, trained and scanned like decoder sites.

References come from elsewhere than the code under test: the vision model's own ``output_hidden_states`` (called
through its own module path), Qwen-VL's own patch embedding and merger output, and the real Qwen2-VL image
processor's patch order.
"""

import numpy as np
import pytest
import torch

import vlmsae
from vlmsae.analysis import patch_grid, patch_layout
from vlmsae.zoo import FAMILIES, build_inputs, tiny_inputs, tiny_model

from conftest import hook_snapshot, logits

VISION_SITES = ["vision.blocks.0.hook_resid_pre", "vision.blocks.1.hook_resid_post", "vision.hook_proj_out"]


def vision_states(model, family: str, inputs: dict) -> tuple:
    """The vision model's own ``hidden_states``, calling it by its module path in transformers 5."""
    with torch.no_grad():
        if family == "vit-gpt2":
            out = model.encoder(pixel_values=inputs["pixel_values"], output_hidden_states=True)
        elif family.startswith("qwen"):
            out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], output_hidden_states=True)
        elif family in ("idefics3", "smolvlm"):
            out = model.model.vision_model(pixel_values=inputs["pixel_values"][:, 0], output_hidden_states=True)
        else:
            out = model.model.vision_tower(pixel_values=inputs["pixel_values"], output_hidden_states=True)
    return out.hidden_states


def sites_of(family: str) -> list[str]:
    return VISION_SITES[:2] if family == "vit-gpt2" else VISION_SITES


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_capture_equals_the_vision_models_own_hidden_states(family):
    """rec at vision.resid_pre L is hidden_states[L], at resid_post L hidden_states[L + 1], captured while the whole
    VLM runs. Qwen-VL's flat (patches, d) tower is shown per image in the processor's order: for Qwen2.5-VL, whose
    blocks run in window order, the row order is found from the patch embedding (computed here, in the
    processor's order), and it must not be the identity. (A fresh model: calling a vision tower for its hidden
    states makes transformers install its capture hooks there.)"""
    model = tiny_model(family)
    inputs = tiny_inputs(model, 2, padding="left")
    states = vision_states(model, family, inputs)
    n = len(states) - 1
    with torch.no_grad(), vlmsae.record(model, range(n), site="vision.resid_pre") as pre, \
            vlmsae.record(model, range(n), site="vision.resid_post") as post:
        model(**inputs)
    d = states[0].shape[-1]
    order = None
    if family == "qwen2.5-vl":
        embedded = model.model.visual.patch_embed(inputs["pixel_values"]).detach()  # processor order
        order = (embedded[:, None] == states[0][None]).all(-1).float().argmax(1)  # processor row i -> tower row
        assert torch.equal(states[0][order], embedded)
        assert not torch.equal(order, torch.arange(len(order))), "the window order is exercised"
    for layer in range(n):
        for rec, state in ((pre, states[layer]), (post, states[layer + 1])):
            got = rec[layer]
            if family.startswith("qwen"):  # (images, patches, d) in the processor's order
                assert got.shape == (2, 64, d)
                want = state if order is None else state[order]
                assert torch.equal(got.reshape(-1, d), want)
            else:
                assert torch.equal(got, state)
    kinds = post.kinds(0)
    cls = family in ("vit-gpt2", "llava")
    assert (kinds[:, 0] == (vlmsae.Kind.SPECIAL if cls else vlmsae.Kind.IMAGE)).all()
    assert (kinds[:, 1:] == vlmsae.Kind.IMAGE).all()


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_qwen_merger_output_is_in_the_processor_order(family):
    """vision.proj_out equals the vision model's pooler output, which transformers has put back in the processor's
    order (Qwen2.5-VL: after the window order), per image."""
    model = tiny_model(family)
    inputs = tiny_inputs(model, 2)
    with torch.no_grad():
        out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        with vlmsae.record(model, "vision.hook_proj_out") as rec:
            model(**inputs)
    merged = out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 4 returned the tensor
    assert rec[0].shape == (2, 16, merged.shape[-1])
    assert torch.equal(rec[0].reshape(-1, merged.shape[-1]), merged)


def _linear_readout(rows: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """The value ``v`` of a constant patch from a patch embedding ``v * weight.sum() + bias`` of it."""
    w = weight.reshape(weight.shape[0], -1).sum(1)
    rows = rows if bias is None else rows - bias
    return rows @ w / (w @ w)


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl"])
def test_qwen_vision_rows_land_on_their_patch(family):
    """The real Qwen2-VL image processor lays out an image whose patch (r, c) holds the value 10 r + c; the patch
    embedding (bias-free, linear) keeps that value readable at each row of vision.resid_pre of layer 0, and
    patch_grid(patch_layout(...)) puts every row back on its patch, through Qwen2.5-VL's window order too."""
    from transformers import Qwen2VLImageProcessor

    model = tiny_model(family)
    image = np.zeros((32, 32, 3), dtype=np.float32)
    for r in range(8):
        for c in range(8):
            image[4 * r:4 * r + 4, 4 * c:4 * c + 4] = 10 * r + c
    processor = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                                      max_pixels=32 * 32, do_rescale=False, do_normalize=False)
    processed = processor(images=[image], return_tensors="pt", input_data_format="channels_last")
    inputs = tiny_inputs(model, 1)
    assert processed["pixel_values"].shape == inputs["pixel_values"].shape
    inputs.update(pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"])
    with torch.no_grad(), vlmsae.record(model, "vision.blocks.0.hook_resid_pre") as rec:
        model(**inputs)
    values = _linear_readout(rec[0], model.model.visual.patch_embed.proj.weight)  # (1, 64)
    grid = patch_grid(values, patch_layout(model, inputs, "vision.resid_pre"))
    want = 10 * torch.arange(8)[:, None] + torch.arange(8)
    assert torch.allclose(grid[0], want.float(), atol=1e-3)


def test_vit_rows_land_on_their_patch():
    """ViT (row-major after the class token): with the position embeddings zeroed, each patch's value reads back
    from its row of vision.resid_pre of layer 0 and lands on its patch."""
    model = tiny_model("vit-gpt2")
    with torch.no_grad():
        model.encoder.embeddings.position_embeddings.zero_()
    images = torch.zeros(1, 3, 32, 32)
    for r in range(4):
        for c in range(4):
            images[..., 8 * r:8 * r + 8, 8 * c:8 * c + 8] = (10 * r + c) / 100
    inputs = build_inputs(model, images, [[7, 8]])
    with torch.no_grad(), vlmsae.record(model, "vision.blocks.0.hook_resid_pre") as rec:
        model(**inputs)
    conv = model.encoder.embeddings.patch_embeddings.projection
    patches = rec[0][rec.kinds(0) == vlmsae.Kind.IMAGE][None]  # (1, 16, d): the class token left out
    values = (_linear_readout(patches, conv.weight, conv.bias) + 1) / 2 * 100  # pixels were (x - 0.5) / 0.5
    grid = patch_grid(values, patch_layout(model, inputs, "vision.resid_pre"))
    assert torch.allclose(grid[0], (10 * torch.arange(4)[:, None] + torch.arange(4)).float(), atol=1e-3)


def test_no_hook_left_after_an_exception_at_a_vision_site(model, family):
    inputs = tiny_inputs(model, 2)
    clean = logits(model, inputs)
    before = hook_snapshot(model)

    def boom(resid, fwd):
        raise RuntimeError("boom")

    for name in sites_of(family):
        with pytest.raises(RuntimeError, match="boom"), vlmsae.attach(model, {name: boom}):
            model(**inputs)
        with pytest.raises(RuntimeError, match="boom"), vlmsae.attach(model, {name: boom}):
            with vlmsae.record(model, name, stop=True):  # the stopping context unwinds too
                model(**inputs)
        assert hook_snapshot(model) == before
    assert torch.equal(logits(model, inputs), clean)


def test_splice_with_the_error_term_at_vision_sites_reproduces_clean_logits(model, family):
    """The error-term splice put back through each tower's layout (Qwen's flat rows, in window order for Qwen2.5-VL)
    leaves the logits bit-for-bit; an edit that keeps the latents makes the hook write its result back."""
    inputs = tiny_inputs(model, 2, padding="left")
    clean = logits(model, inputs)
    for name in sites_of(family):
        site = vlmsae.sites.parse_site(name)[1]
        sae = vlmsae.SAE(d_in=vlmsae.layers(model).width(site), d_sae=64, k=8)
        with vlmsae.splice(model, name, sae, use_error_term=True, edit=lambda z, fwd: z.clone()) as s:
            spliced = logits(model, inputs)
        assert torch.equal(spliced, clean), name
        assert s.latents is not None and s.latents.shape[-1] == 64
        with vlmsae.splice(model, name, sae):
            assert not torch.allclose(logits(model, inputs), clean), name


def test_steer_at_vision_sites_changes_the_output(model, family):
    inputs = tiny_inputs(model, 2)
    clean = logits(model, inputs)
    for name in sites_of(family):
        site = vlmsae.sites.parse_site(name)[1]
        v = torch.randn(vlmsae.layers(model).width(site), generator=torch.Generator().manual_seed(0))
        with vlmsae.steer(model, name, v, strength=4.0):
            steered = logits(model, inputs)
        assert (steered - clean).abs().max() > 1e-3, name
    name = "vision.blocks.1.hook_resid_post"
    v = torch.randn(vlmsae.layers(model).width("vision.resid_post"), generator=torch.Generator().manual_seed(0))
    if family in ("vit-gpt2", "llava"):  # a class token: ViT-GPT2's decoder attends to it, LLaVA drops it
        with vlmsae.steer(model, name, v, strength=4.0, where="special"):
            special = logits(model, inputs)
        assert torch.equal(special, clean) == (family == "llava")
    else:
        with pytest.raises(vlmsae.ConfigError, match=r"whose positions are \['image'\]"):
            with vlmsae.steer(model, name, v, where="special"):
                pass
    with pytest.raises(vlmsae.ConfigError, match="whose positions are"):
        with vlmsae.steer(model, "vision.blocks.1.hook_resid_post", v, where="text"):
            pass


def test_steering_one_patch_moves_that_patch_only():
    """A where= callable selecting one position: the recorded change is at that image and patch alone, through
    Qwen2.5-VL's window order (the steered row is written back where it was read)."""
    model = tiny_model("qwen2.5-vl")
    inputs = tiny_inputs(model, 2)
    v = torch.ones(vlmsae.layers(model).width("vision.resid_post"))

    def one(fwd):
        mask = torch.zeros(fwd.kinds.shape, dtype=torch.bool)
        mask[1, 5] = True
        return mask

    with torch.no_grad():
        with vlmsae.record(model, [0], site="vision.resid_post") as clean:
            model(**inputs)
        with vlmsae.steer(model, 0, v, site="vision.resid_post", where=one), \
                vlmsae.record(model, [0], site="vision.resid_post") as steered:
            model(**inputs)
    moved = (steered[0] - clean[0]).abs().amax(-1) > 0
    assert moved.nonzero().tolist() == [[1, 5]]


def test_llava_reads_the_vision_layer_its_config_names():
    """LLaVA takes the vision tower's hidden_states[vision_feature_layer], which transformers captures from the
    layer's output: with -2, an edit at the input of the last vision layer reaches the decoder, one at its output
    does not."""
    model = tiny_model("llava")
    model.config.vision_feature_layer = -2
    inputs = tiny_inputs(model, 2)
    clean = logits(model, inputs)
    v = torch.randn(vlmsae.layers(model).width("vision.resid_pre"), generator=torch.Generator().manual_seed(1))
    with vlmsae.steer(model, "vision.blocks.1.hook_resid_pre", v, strength=4.0):
        assert (logits(model, inputs) - clean).abs().max() > 1e-3
    with vlmsae.steer(model, "vision.blocks.1.hook_resid_post", v, strength=4.0):
        assert torch.equal(logits(model, inputs), clean)


@pytest.mark.parametrize("family, name", [("llava", "vision.blocks.1.hook_resid_post"),
                                          ("qwen2.5-vl", "vision.blocks.0.hook_resid_pre"),
                                          ("gemma3", "vision.hook_proj_out")])
def test_train_at_a_vision_site(tmp_path, family, name):
    model = tiny_model(family)
    batches = [tiny_inputs(model, 4, seed=i) for i in range(3)]
    layer, site = vlmsae.sites.parse_site(name)
    width = vlmsae.layers(model).width(site)
    sae = vlmsae.SAE(d_in=width, d_sae=4 * width, k=4)
    before = sae.W_enc.detach().clone()
    run = vlmsae.train(model, name, batches, sae, steps=6, batch_size=16, buffer_size=64, progress=False,
                       out=tmp_path, k_start=None, warmup_steps=1, sync_every=3)
    assert not torch.equal(sae.W_enc, before)
    assert len(run.history) == 2 and all(np.isfinite(h["fvu"]) for h in run.history)
    saved = vlmsae.SAE.load(tmp_path / f"L{layer}")
    assert saved.metadata["hook_name"] == name
    assert saved.metadata["hf_layer_path"] == vlmsae.layers(model).module_path(layer, site)
    with vlmsae.splice(model, name, saved):  # its own site: no HookNameWarning
        model(**batches[0])


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_scan_at_a_vision_site_gives_heatmaps_on_the_patch_grid(family):
    model = tiny_model(family)
    batches = [tiny_inputs(model, 3, seed=i) for i in range(2)]
    sae = vlmsae.SAE(d_in=vlmsae.layers(model).width("vision.resid_post"), d_sae=32, k=4)
    name = "vision.blocks.1.hook_resid_post"
    result = vlmsae.scan(model, name, sae, batches, n_examples=2, latents=[0, 1, 2])
    side = 4 if family == "llava" else 8
    assert result.tokens == 6 * side * side  # every patch of every image, no class token
    with torch.no_grad():
        acts = []
        for batch in batches:
            with vlmsae.record(model, name) as rec:
                model(**batch)
            patches = rec[1][:, 1:] if family == "llava" else rec[1]  # (images, patches, d)
            acts.append(sae.encode(patches))
        acts = torch.cat(acts)  # (6, patches, d_sae)
    for row, latent in enumerate([0, 1, 2]):
        heat = result.top.heatmap(row)
        assert heat.shape == (2, side, side)
        for i, example in enumerate(result.top.example[row].tolist()):
            values = acts[example, :, latent]
            if family == "llava":  # CLIP-ViT: row-major
                want = values.reshape(side, side)
            else:  # Qwen's processor order: 2x2 blocks of patches, the blocks row-major (Qwen2VLImageProcessor)
                want = values.reshape(side // 2, side // 2, 2, 2).permute(0, 2, 1, 3).reshape(side, side)
            assert torch.allclose(heat[i], want)
            assert result.top.values[row, i] == values.max()


def test_site_names_and_errors():
    model = tiny_model("llava")
    info = vlmsae.layers(model)
    assert info.hook_name(1, "vision.resid_post") == "vision.blocks.1.hook_resid_post"
    assert info.hook_name(0, "vision.proj_out") == "vision.hook_proj_out"
    assert vlmsae.sites.parse_site("vision.blocks.1.hook_out") == (1, "vision.resid_post")
    assert vlmsae.sites.parse_site(0, "vision.hook_resid_pre") == (0, "vision.resid_pre")
    assert info.module_path(1, "vision.resid_post") == "model.vision_tower.encoder.layers.1"
    with pytest.raises(vlmsae.LayerIndexError, match="2 vision tower layers; valid layers: 0..1"):
        with vlmsae.record(model, [2], site="vision.resid_post"):
            pass
    with pytest.raises(vlmsae.LayerIndexError, match="pass layer=0"):
        with vlmsae.record(model, [1], site="vision.proj_out"):
            pass
    with pytest.raises(vlmsae.SiteError, match="not a hook site of this vit-gpt2 model"):
        with vlmsae.record(tiny_model("vit-gpt2"), "vision.hook_proj_out"):
            pass
    with pytest.raises(vlmsae.SiteError, match="not a site vlmsae hooks"):
        vlmsae.sites.parse_site("vision.hook_foo")
    sae = vlmsae.SAE(d_in=info.width("vision.resid_post") + 16, d_sae=8, k=2)
    with pytest.raises(vlmsae.ConfigError, match="vision.resid_post site has width"):
        with vlmsae.splice(model, "vision.blocks.0.hook_resid_post", sae):
            pass


@pytest.mark.parametrize("family", ["vit-gpt2", "qwen2.5-vl"])
def test_evaluate_at_a_vision_site_reads_the_decoders_loss(family):
    """The loss is the decoder's, at the same positions, whichever site is spliced: ce_clean and loss_tokens equal a
    decoder-site evaluation's; the vision SAE's FVU is over every patch."""
    model = tiny_model(family)
    batches = [tiny_inputs(model, 3, seed=i, padding="left") for i in range(2)]
    width = vlmsae.layers(model).width("vision.resid_post")
    vision = vlmsae.evaluate(model, "vision.blocks.0.hook_resid_post", vlmsae.SAE(d_in=width, d_sae=64, k=8), batches)
    decoder = vlmsae.evaluate(model, 1, vlmsae.SAE(d_in=vlmsae.layers(model).d_model, d_sae=64, k=8), batches)
    assert list(vision.index) == ["all"]
    assert vision.loc["all", "ce_clean"] == pytest.approx(decoder.loc["all", "ce_clean"], rel=1e-6)
    assert vision.loc["all", "loss_tokens"] == decoder.loc["all", "loss_tokens"]
    assert vision.loc["all", "ce_spliced"] != vision.loc["all", "ce_clean"]
    patches = (4 * 4 + 1) if family == "vit-gpt2" else 64  # ViT's class token is spliced too (where=None)
    assert vision.loc["all", "spliced_tokens"] == 6 * patches


def narrow_vision(family: str):
    """A tiny model whose vision tower is 48 wide and its decoder 64: widths read from the right config field."""
    from transformers import LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration

    from vlmsae.zoo import tiny_config

    config = tiny_config(family)
    vision = config.vision_config
    if family == "qwen2-vl":  # the ViT's width is embed_dim; hidden_size is the merger's output (the decoder's)
        vision.embed_dim = 48
    else:
        vision.hidden_size, vision.intermediate_size = 48, 96
    torch.manual_seed(0)
    cls = LlavaForConditionalGeneration if family == "llava" else Qwen2VLForConditionalGeneration
    return cls(config).eval()


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_vision_widths_come_from_the_towers_config(family):
    model = narrow_vision(family)
    info = vlmsae.layers(model)
    assert (info.width("vision.resid_post"), info.width("vision.proj_out"), info.d_model) == (48, 64, 64)
    inputs = tiny_inputs(model, 2)
    with torch.no_grad(), vlmsae.record(model, "vision.blocks.1.hook_resid_post") as rec, \
            vlmsae.record(model, "vision.hook_proj_out") as proj:
        model(**inputs)
    assert rec[1].shape[-1] == 48 and proj[0].shape[-1] == 64


def test_harvest_at_a_vision_site_then_train_from_the_shards(tmp_path):
    model = narrow_vision("llava")
    batches = [tiny_inputs(model, 2, seed=i) for i in range(2)]
    folder = vlmsae.harvest(model, [1], batches, tmp_path / "shards", site="vision.resid_post")
    sae = vlmsae.SAE(d_in=48, d_sae=64, k=4)
    vlmsae.train(None, 1, vlmsae.Shards(folder), sae, steps=2, batch_size=8, buffer_size=32, progress=False,
                 site="vision.resid_post", k_start=None, warmup_steps=1)
    assert sae.metadata["hook_name"] == "vision.blocks.1.hook_resid_post"
    with vlmsae.splice(model, "vision.blocks.1.hook_resid_post", sae, use_error_term=True):
        model(**batches[0])


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl"])
def test_gradients_flow_through_an_edit_at_a_vision_site(family):
    """The in-place write is recorded by autograd: d(logits)/d(v) for a v added at the tower is that of the model."""
    model = tiny_model(family)
    inputs = tiny_inputs(model, 2)
    for name in ("vision.blocks.1.hook_resid_pre", "vision.blocks.1.hook_resid_post", "vision.hook_proj_out"):
        v = torch.zeros(vlmsae.layers(model).width(vlmsae.sites.parse_site(name)[1]), requires_grad=True)
        with vlmsae.attach(model, {name: lambda resid, fwd: resid + v}):
            model(**inputs).logits.pow(2).sum().backward()
        assert v.grad is not None and v.grad.abs().sum() > 0, name
