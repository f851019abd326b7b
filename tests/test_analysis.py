"""Feature analysis: the running top-k equals a brute-force top-k, heatmaps land on the patch grid, tables add up."""

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

import vlmsae
from vlmsae import Kind
from vlmsae.analysis import (PatchLayout, concept_aurocs, latent_table, image_question_grid, patch_grid,
                             patch_layout, scan)
from vlmsae.errors import ConfigError
from vlmsae.probes import compare_probes, probe_accuracy
from vlmsae.testbed import models, shapes
from vlmsae.zoo import qwen_patchify, tiny_inputs, tiny_model

LAYER = 1


def relu_sae(d_in: int, d_sae: int = 48, seed: int = 0) -> vlmsae.SAE:
    """A ReLU SAE whose features fire on part of the tokens, so top-k orders are not ties at zero."""
    torch.manual_seed(seed)
    sae = vlmsae.SAE(d_in=d_in, d_sae=d_sae, architecture="relu")
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae))
        sae.b_enc.copy_(-0.5 * torch.rand(d_sae))
    return sae.eval()


def brute_force(model, sae, data, where_kinds, features):
    """Every example's peak, its position and its image-token activations, computed example by example."""
    peaks, positions, heats, ids = [], [], [], []
    for batch in data:
        with vlmsae.record(model, [LAYER], stop=True) as rec:
            model(**batch)
        latents = sae.encode(rec[LAYER]).detach().float()[..., features]
        kinds = rec.kinds(LAYER)
        for b in range(latents.shape[0]):
            read = torch.isin(kinds[b], torch.tensor(where_kinds, dtype=kinds.dtype))
            acts = latents[b][read]  # (n_read, F)
            peak, at = acts.max(0)
            peaks.append(peak)
            positions.append(read.nonzero().flatten()[at])
            heats.append(latents[b][kinds[b] == Kind.IMAGE].T)  # (F, n_image)
            ids.append(rec.forwards[0].ids[b])
    return torch.stack(peaks, 1), torch.stack(positions, 1), heats, ids


@pytest.mark.parametrize("family", ["llava", "qwen2-vl", "vit-gpt2", "gemma3", "paligemma", "idefics3", "smolvlm"])
def test_running_topk_equals_brute_force(family):
    model = tiny_model(family, n_layers=2)
    sae = relu_sae(64)
    # batches of different sizes and paddings, so examples move between batches
    data = [tiny_inputs(model, n, seed=s, text_len=6) for s, n in enumerate([3, 1, 4, 2, 5])]
    features = [0, 5, 7, 11, 20, 33, 47]
    k = 6
    found = scan(model, LAYER, sae, data, n_examples=k, latents=features, context=2)
    kinds = (Kind.IMAGE, Kind.TEXT, Kind.GENERATED)
    peaks, positions, heats, ids = brute_force(model, sae, data, kinds, features)
    top = found.top
    assert top.values.shape == (len(features), k)
    for row in range(len(features)):
        want = peaks[row].topk(k)
        torch.testing.assert_close(top.values[row], want.values, rtol=1e-5, atol=1e-6)
        positive = want.values > 0  # examples where the feature did not fire tie at zero in any order
        assert top.example[row][positive].tolist() == want.indices[positive].tolist()
        for j in positive.nonzero().flatten().tolist():
            example = int(top.example[row, j])
            assert int(top.position[row, j]) == int(positions[row, example])
            centre = top.tokens[row, j, 2]
            assert int(centre) == int(ids[example][positions[row, example]])
            torch.testing.assert_close(top.token_acts[row, j, 2], top.values[row, j])
            if top.image_acts is not None:
                flat = heats[example][row]
                torch.testing.assert_close(top.image_acts[row, j], flat)  # one value per image token
                torch.testing.assert_close(top.heatmap(row)[j], patch_grid(flat, top.layout))
                torch.testing.assert_close(top.heat[row, j], patch_grid(flat, top.layout))
    if family == "vit-gpt2":
        assert top.heat is None and top.layout is None
    else:
        assert top.layout == PatchLayout((4, 4), 1) if family in ("llava", "paligemma") else PatchLayout((8, 8), 2)


def test_fewer_examples_than_k_leave_empty_slots():
    model = tiny_model("llava", n_layers=2)
    found = scan(model, LAYER, relu_sae(64), [tiny_inputs(model, 2)], n_examples=5, latents=[1, 2])
    assert (found.top.example[:, 2:] == -1).all()
    assert torch.isinf(found.top.values[:, 2:]).all()


def test_scan_keeps_one_value_per_image_token_and_bounds_its_memory():
    """Qwen merges 2x2 patches per image token: the top examples keep the tokens' values (a quarter of the patch
    grid) and expand on demand; a scan whose top examples would not fit max_top_bytes stops at the first batch,
    naming the size and how many latents fit."""
    model = tiny_model("qwen2.5-vl", n_layers=2)
    inputs = tiny_inputs(model, 2)
    found = scan(model, LAYER, relu_sae(64), [inputs], n_examples=3, latents=[1, 2])
    layout = found.top.layout
    assert layout.merge == 2 and found.top.image_acts.shape == (2, 3, layout.n_tokens)
    assert found.top.heatmap(0).shape == (3, *layout.grid) and layout.grid[0] * layout.grid[1] == 4 * layout.n_tokens
    per_example = 4 * layout.n_tokens + 4 + 8 + 8 + (8 + 4) * 9  # image acts, value, example, position, window
    need = 256 * (3 + 2) * per_example
    with pytest.raises(vlmsae.ConfigError, match=r"MiB of top examples on cpu \(256 latents x 3 examples, "
                                                  rf"{per_example} bytes each, .*about 128 of them fit"):
        scan(model, LAYER, relu_sae(64, d_sae=256), [inputs], n_examples=3, max_top_bytes=need // 2)
    scan(model, LAYER, relu_sae(64, d_sae=256), [inputs], n_examples=3, max_top_bytes=need)


def test_qwen_heatmap_follows_the_2x2_merge():
    """Tokens made the way Qwen's vision tower makes them (merge consecutive patches of qwen_patchify's
    order) land back on the patches they came from."""
    gh, gw, merge, patch = 6, 8, 2, 4
    rows = torch.arange(gh).repeat_interleave(patch)[:, None].expand(gh * patch, gw * patch)
    cols = torch.arange(gw).repeat_interleave(patch)[None, :].expand(gh * patch, gw * patch)
    patch_id = (rows * gw + cols).float()  # (H, W): each pixel knows its patch
    image = patch_id.expand(1, 3, -1, -1)
    flat, grid = qwen_patchify(image, patch=patch, merge=merge)
    assert grid.tolist() == [[1, gh, gw]]
    tokens = flat[:, 0].reshape(-1, merge * merge).mean(1)  # the merger pools each run of merge^2 patches
    mapped = patch_grid(tokens, PatchLayout((gh, gw), merge))
    ids = patch_id[::patch, ::patch]  # (gh, gw)
    pooled = ids.reshape(gh // merge, merge, gw // merge, merge).mean((1, 3))
    want = pooled.repeat_interleave(merge, 0).repeat_interleave(merge, 1)
    torch.testing.assert_close(mapped, want)
    # and each patch's own id is inside the block of its token
    assert ((mapped - ids).abs() <= (gw + 1) / 2).all()


def test_patch_layout_of_zoo_models():
    for family, want in (("llava", PatchLayout((4, 4), 1)), ("qwen2-vl", PatchLayout((8, 8), 2)),
                         ("vit-gpt2", None), ("paligemma", PatchLayout((4, 4), 1)),
                         ("gemma3", PatchLayout((8, 8), 2)), ("idefics3", PatchLayout((8, 8), 2)),
                         ("smolvlm", PatchLayout((8, 8), 2))):
        model = tiny_model(family, n_layers=1)
        assert patch_layout(model, tiny_inputs(model, 1)) == want
    with pytest.raises(ConfigError, match="16 image tokens"):
        patch_grid(torch.zeros(16), PatchLayout((6, 6), 1))


def test_feature_table_matches_the_recorded_latents():
    model = tiny_model("llava", n_layers=2)
    sae = relu_sae(64)
    data = [tiny_inputs(model, 3, seed=s) for s in range(3)]
    found = scan(model, LAYER, sae, data, n_examples=4)
    table = latent_table(found)
    latents, kinds = [], []
    for batch in data:
        with vlmsae.record(model, [LAYER], stop=True) as rec:
            model(**batch)
        read = torch.isin(rec.kinds(LAYER), torch.tensor([Kind.IMAGE, Kind.TEXT], dtype=torch.int8))
        latents.append(sae.encode(rec[LAYER])[read].detach())
        kinds.append(rec.kinds(LAYER)[read])
    latents, kinds = torch.cat(latents), torch.cat(kinds)
    assert found.tokens == latents.shape[0]
    fired = (latents > 0).double()
    np.testing.assert_allclose(table["density"], fired.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(table["max"], latents.amax(0).clamp_min(0).numpy(), rtol=1e-5)
    image_share = fired[kinds == Kind.IMAGE].sum(0) / fired.sum(0).clamp_min(1)
    np.testing.assert_allclose(table["image_fraction"], image_share.numpy(), rtol=1e-6)
    np.testing.assert_allclose(table["image_fraction"] + table["text_fraction"], (fired.sum(0) > 0).double().numpy())
    assert table["dead"].tolist() == (fired.sum(0) == 0).tolist()
    assert set(table.columns) >= {"density", "log10_density", "mean", "mean_firing", "max", "image_fraction",
                                  "text_fraction", "dead", "dense", "top_tokens"}
    assert (table.loc[~table["dead"], "top_tokens"] != "").all()
    # L0 counts cover every non-pad position once
    assert int(found.l0_counts.sum()) == sum(int((b["attention_mask"] > 0).sum()) for b in data)


def test_concept_aurocs_scores_each_value_within_its_concept():
    torch.manual_seed(0)
    groups = pd.Series(["color"] * 40 + ["shape"] * 40)
    values = pd.Series(["red", "blue"] * 20 + ["circle", "square"] * 20)
    latents = torch.rand(80, 6)
    latents[:, 3] = torch.tensor([1.0 if v == "red" else 0.0 for v in values])
    table = concept_aurocs(latents, values, groups)
    assert list(table.index) == [("color", "blue"), ("color", "red"), ("shape", "circle"), ("shape", "square")]
    assert table.loc[("color", "red"), 3] == 1.0
    assert table.loc[("color", "blue"), 3] == 0.0


def test_image_tokens_cannot_depend_on_the_question():
    """In LLaVA the image comes before the question and attention is causal: on image tokens a feature
    depends on the image only; on the question's tokens it depends on the question."""
    model = tiny_model("llava", n_layers=2)
    sae = relu_sae(64)
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    questions = ["10 11 12", "40 41", "90 91 92 93"]

    def inputs(chunk, question):
        return vlmsae.zoo.build_inputs(model, chunk, [[int(w) for w in question.split()]] * len(chunk))

    features = [0, 3, 9, 21]
    on_image = image_question_grid(model, LAYER, sae, images, questions, inputs, latents=features, where="image",
                                   batch_size=2)
    assert on_image.values.shape == (4, 5, 3)
    share = on_image.dependence()
    live = share["mean"] > 0
    assert live.any()
    np.testing.assert_allclose(share.loc[live, "question_share"], 0, atol=1e-8)
    np.testing.assert_allclose(share.loc[live, "image_share"], 1, atol=1e-6)
    on_text = image_question_grid(model, LAYER, sae, images, questions, inputs, latents=features, where="text",
                                  reduce="last")
    assert (on_text.dependence()["question_share"].fillna(0) > 0).any()


def test_probes_read_a_linear_concept_and_not_noise():
    torch.manual_seed(0)
    y = torch.randint(0, 4, (400,))
    signal = torch.randn(400, 16) + 5 * torch.nn.functional.one_hot(y, 16).float()
    noise = torch.randn(400, 16)
    table = compare_probes({"signal": signal, "noise": noise}, {"class": y})
    assert table.loc["class", "signal"] > 0.95
    assert table.loc["class", "noise"] < 0.5
    result = probe_accuracy(signal, [str(int(v)) for v in y])  # string labels too
    assert result.test == table.loc["class", "signal"] and 0.2 < result.chance < 0.35


qa_shipped = pytest.mark.skipif(not models.QA_DIR.is_dir(), reason=f"no testbed QA model in {models.QA_DIR}; "
                                 "train it with `python -m vlmsae.testbed train qa`")


@qa_shipped
def test_heatmaps_put_the_hot_patch_on_the_object():
    """On the LLaVA Shapes model, the image features that best detect each colour's patches are hottest,
    in each of their top examples, on a patch that an object covers."""
    torch.manual_seed(0)
    model, tokenizer = models.load_qa()
    info = vlmsae.layers(model)
    layer = info.n_layers // 2

    def batches(seed):
        for i in itertools.count():
            yield shapes.qa_inputs(shapes.make_samples(32, seed + i), tokenizer, "color", labels=False)

    sae = vlmsae.train(model, layer, batches(100), vlmsae.SAE(d_in=info.d_model, d_sae=4 * info.d_model, k=8),
                       steps=60, batch_size=256, buffer_size=4096, kinds=("image",), warmup_steps=10,
                       progress=False).sae
    samples = shapes.make_samples(128, seed=7)
    data = [shapes.qa_inputs(samples[i:i + 32], tokenizer, "color", labels=False) for i in range(0, 128, 32)]
    latents, colors = [], []
    for batch, start in zip(data, range(0, 128, 32)):
        with vlmsae.record(model, [layer], stop=True) as rec:
            model(**batch)
        latents.append(sae.encode(rec[layer][rec.kinds(layer) == Kind.IMAGE]).detach())
        for s in samples[start:start + 32]:
            colors += [s.objects[o].color if o >= 0 else "none" for o in s.patch_labels().reshape(-1)]
    aurocs = concept_aurocs(torch.cat(latents), pd.Series(colors), pd.Series(["patch"] * len(colors)))
    best = {c: int(aurocs.loc[("patch", c)].idxmax()) for c in shapes.COLORS}
    found = scan(model, layer, sae, data, n_examples=8, latents=sorted(set(best.values())), where="image")
    assert found.top.layout == PatchLayout((shapes.GRID, shapes.GRID), 1)
    on_object, on_colour = [], []
    for color, feature in best.items():
        row = found.top.row(feature)
        for j in range(8):
            example = int(found.top.example[row, j])
            if example < 0 or found.top.values[row, j] <= 0:
                continue
            heat = found.top.heatmap(row)[j]
            r, c = divmod(int(heat.argmax()), heat.shape[1])
            owner = samples[example].patch_labels()[r, c]
            on_object.append(owner >= 0)
            on_colour.append(owner >= 0 and samples[example].objects[owner].color == color)
    print("best feature and AUROC per colour:",
          {c: (f, round(float(aurocs.loc[("patch", c), f]), 3)) for c, f in best.items()})
    print(f"hot patch on an object: {sum(on_object)}/{len(on_object)}; "
          f"on an object of the feature's colour: {sum(on_colour)}/{len(on_colour)}")
    assert len(on_object) >= 8 and sum(on_object) >= 0.9 * len(on_object)


@pytest.mark.parametrize("family", ["gemma3", "idefics3", "smolvlm"])
def test_merged_image_tokens_land_on_their_patches(family):
    """Each image token of Gemma 3 (average pool) and Idefics3 / SmolVLM (pixel shuffle) is made, by the model's own
    projector, from the patches ``patch_grid`` puts it on: patch i enters as the one-hot vector e_i."""
    model = tiny_model(family, n_layers=1)
    layout = patch_layout(model, tiny_inputs(model, 1))
    n_patches = layout.grid[0] * layout.grid[1]
    one_hot = torch.eye(n_patches)[None]  # (1, patches, vision hidden = patches)
    with torch.no_grad():
        if family == "gemma3":
            projector = model.model.multi_modal_projector
            projector.mm_input_projection_weight.copy_(torch.eye(n_patches))  # keep the pooled one-hots as they are
            tokens = projector(one_hot)[0]  # (tokens, patches)
        else:
            tokens = model.model.connector.pixel_shuffle(one_hot, model.config.scale_factor)[0]
            tokens = tokens.reshape(layout.n_tokens, -1, n_patches).sum(1)  # the merged patches' one-hots, side by side
    made_from = tokens != 0  # (tokens, patches): which patches each token holds
    for t in range(layout.n_tokens):
        where = patch_grid(torch.eye(layout.n_tokens)[t], layout).flatten() != 0  # the patches the heatmap gives t
        assert torch.equal(made_from[t], where), t
