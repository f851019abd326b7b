"""Export to Neuronpedia (issue 16, item 4): the upload-batch and SAEDashboard layouts, their values against the
scan's, the labels as explanations, batch files written atomically, bad input refused; the dashboard shows the
same labels."""

import json

import pandas as pd
import pytest
import torch

import vlmsae
import vlmsae.export
from vlmsae import ConfigError
from vlmsae.analysis import latent_table, scan
from vlmsae.dashboard import dashboard_data, script_json, write_dashboard
from vlmsae.export import neuronpedia_json, write_neuronpedia

from test_dashboard import tiny_llava_scan

LAYER = 1
HOSTILE = ["</script><script>window.__pwned=1</script>", "<!--<script>", "\"'&<>\\", "nul\x00here", "ünï ☃ \U0001F600"]
# what Neuronpedia's converter reads from every feature of a SAEDashboard batch (it indexes them, so all required)
SAEDASHBOARD_FEATURE = ["feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                        "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
                        "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
                        "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights",
                        "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                        "decoder_weights_dist", "activations"]
SAEDASHBOARD_ACTIVATION = ["tokens", "values", "bin_min", "bin_max", "bin_contains", "qualifying_token_index"]


@pytest.fixture(scope="module")
def built():
    return tiny_llava_scan()


def fired(found, latent):
    """Columns j of the latent's top examples where it fires, best first."""
    row = found.top.row(latent)
    return [j for j in range(found.top.values.shape[1])
            if int(found.top.example[row, j]) >= 0 and float(found.top.values[row, j]) > 0]


def test_upload_layout_has_neuronpedias_keys_and_types(built):
    _, _, found, _ = built
    data = neuronpedia_json(found, model_id="tiny-llava", layer=LAYER)
    assert set(data) == {"modelId", "source", "features"}
    assert data["modelId"] == "tiny-llava" and data["source"] == f"{LAYER}-vlmsae-res"
    live = [f for f in found.top.latents.tolist() if fired(found, f)]
    assert [f["index"] for f in data["features"]] == live and 0 < len(live) <= 128
    table = latent_table(found)
    for feature in data["features"]:
        assert set(feature) == {"index", "density", "topLogits", "bottomLogits", "explanations", "activations"}
        assert type(feature["index"]) is int and isinstance(feature["density"], float)
        assert 0 <= feature["density"] <= 1 and feature["density"] == table.at[feature["index"], "density"]
        assert feature["explanations"] == [] and feature["topLogits"] is None
        assert 1 <= len(feature["activations"])
        for act in feature["activations"]:
            assert set(act) == {"tokens", "values", "quantileMax", "quantileMin", "quantileFraction"}
            assert 1 <= len(act["tokens"]) == len(act["values"]) <= 1024
            assert all(isinstance(t, str) and t for t in act["tokens"])
            assert all(isinstance(v, float) for v in act["values"])


def test_activations_are_the_scans_patches_then_context(built):
    _, _, found, _ = built
    top = found.top
    data = neuronpedia_json(found, model_id="tiny-llava", layer=LAYER)
    for feature in data["features"]:
        row = top.row(feature["index"])
        heat = top.heatmap(row)
        cols = fired(found, feature["index"])
        assert len(feature["activations"]) == len(cols)
        for act, j in zip(feature["activations"], cols):
            peak = float(top.values[row, j])
            grid = heat[j]
            n_patch = grid.numel()
            assert act["tokens"][:n_patch] == [f"<img r{r}c{c}>" for r in range(4) for c in range(4)]
            expect = [v if v <= peak else 0.0 for v in grid.flatten().tolist()]
            assert act["values"][:n_patch] == pytest.approx(expect, abs=0)
            ids, window = top.tokens[row, j].tolist(), top.token_acts[row, j].tolist()
            kept = [i for i, t in enumerate(ids) if t >= 0]
            assert act["tokens"][n_patch:] == [str(ids[i]) for i in kept]
            assert act["values"][n_patch:] == [window[i] if window[i] <= peak else 0.0 for i in kept]
            assert act["values"][n_patch + kept.index(len(ids) // 2)] == peak  # the peak is in the window
            assert max(act["values"]) == peak  # Neuronpedia's maxValue is the scan's top value


def test_bos_above_the_peak_is_zeroed(built):
    """A position the scan did not read (BOS) may out-fire the peak; exported as 0, so maxValue is the scan's."""
    _, _, found, _ = built
    top = found.top
    above = [(f, j) for f in top.latents.tolist() for j in fired(found, f)
             if float(top.token_acts[top.row(f), j].max()) > float(top.values[top.row(f), j])]
    assert above, "no example with an unread position above its peak: the case is not exercised"
    data = {f["index"]: f for f in neuronpedia_json(found, model_id="m", layer=1)["features"]}
    for latent, j in above:
        act = data[latent]["activations"][fired(found, latent).index(j)]
        assert max(act["values"]) == float(top.values[top.row(latent), j])


def test_labels_arrive_as_explanations_and_survive_any_string(built, tmp_path):
    _, _, found, _ = built
    latents = [f for f in found.top.latents.tolist() if fired(found, f)][:len(HOSTILE)]
    labels = dict(zip(latents, HOSTILE))
    path = write_neuronpedia(tmp_path / "one.json", found, model_id="tiny-llava", layer=LAYER, labels=labels)
    raw = path.read_bytes()
    raw.decode("ascii")  # escaped: the file is ASCII whatever the strings
    back = json.loads(raw)
    assert back == neuronpedia_json(found, model_id="tiny-llava", layer=LAYER, labels=labels)
    got = {f["index"]: [e["text"] for e in f["explanations"]] for f in back["features"]}
    for latent, text in labels.items():
        assert got[latent] == [text.replace("\x00", " ")]
    assert all(not got[f] for f in got if f not in labels)
    # a DataFrame with a label column (index: latent) gives the same; missing labels are no explanation
    frame = pd.DataFrame({"label": [HOSTILE[0], None]}, index=pd.Index(latents[:2], name="latent"))
    data = neuronpedia_json(found, model_id="m", layer=1, labels=frame)
    by_index = {f["index"]: f["explanations"] for f in data["features"]}
    assert [e["text"] for e in by_index[latents[0]]] == [HOSTILE[0]] and by_index[latents[1]] == []


def test_saedashboard_layout_is_what_neuronpedias_converter_reads(built):
    _, _, found, _ = built
    top = found.top
    data = neuronpedia_json(found, model_id="tiny-llava", layer=LAYER, source_set="vlmsae-res",
                            layout="saedashboard", dataset="tiny")
    assert {k: data[k] for k in ("model_id", "layer", "sae_set", "sae_id_suffix")} == \
        {"model_id": "tiny-llava", "layer": LAYER, "sae_set": "vlmsae-res", "sae_id_suffix": None}
    for feature in data["features"]:
        assert all(k in feature for k in SAEDASHBOARD_FEATURE) and "vector" not in feature
        row = top.row(feature["feature_index"])
        for act, j in zip(feature["activations"], fired(found, feature["feature_index"])):
            assert all(k in act for k in SAEDASHBOARD_ACTIVATION)
            peak = float(top.values[row, j])
            assert act["values"][act["qualifying_token_index"]] == peak == max(act["values"])
            assert act["bin_max"] == float(top.values[row].max()) and act["bin_min"] == -1
    with pytest.raises(ConfigError, match="layout='upload'"):
        neuronpedia_json(found, model_id="m", layer=1, layout="saedashboard", labels={0: "x"})


def test_batch_folder_splits_the_features_atomically(built, tmp_path):
    _, _, found, _ = built
    whole = neuronpedia_json(found, model_id="m", layer=1)
    out = tmp_path / "deep" / "np"
    assert write_neuronpedia(out, found, model_id="m", layer=1, batch_size=5) == out
    names = sorted(p.name for p in out.iterdir())
    n = -(-len(whole["features"]) // 5)
    assert names == sorted(f"batch-{i}.json" for i in range(n))
    batches = [json.loads((out / f"batch-{i}.json").read_text()) for i in range(n)]
    assert all(len(b["features"]) <= 5 and b["source"] == "1-vlmsae-res" for b in batches)
    assert [f for b in batches for f in b["features"]] == whole["features"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["np"]  # no temporary folder left
    write_neuronpedia(out, found, model_id="m", layer=1, batch_size=128)  # replaces its own batch files
    assert sorted(p.name for p in out.iterdir()) == ["batch-0.json"]


def test_vision_tower_examples_are_patches_only(built):
    model, data, _, _ = built
    site = "vision.blocks.1.hook_resid_post"
    torch.manual_seed(1)
    sae = vlmsae.SAE(d_in=vlmsae.layers(model).width("vision.resid_post"), d_sae=16, k=4)
    found = scan(model, site, sae, data, n_examples=3)
    top = found.top
    for feature in neuronpedia_json(found, model_id="m", layer=1)["features"]:
        row = top.row(feature["index"])
        for act, j in zip(feature["activations"], fired(found, feature["index"])):
            grid = top.heatmap(row)[j]
            assert len(act["tokens"]) == grid.numel() and all(t.startswith("<img r") for t in act["tokens"])
            assert act["values"] == grid.flatten().tolist() and max(act["values"]) == float(top.values[row, j])


def test_bad_input_is_refused_and_leaves_nothing(built, tmp_path, monkeypatch):
    _, _, found, _ = built
    kw = {"model_id": "m", "layer": 1}
    with pytest.raises(ConfigError, match="latent 1 was not scanned"):
        neuronpedia_json(found, latents=[0, 1], **kw)
    with pytest.raises(ConfigError, match=r"labels for latents \[3\]"):
        neuronpedia_json(found, labels={0: "a", 3: "b"}, **kw)
    with pytest.raises(ConfigError, match="label of latent 0"):
        neuronpedia_json(found, labels={0: 5}, **kw)
    with pytest.raises(ConfigError, match="'label' column"):
        neuronpedia_json(found, labels=pd.DataFrame({"text": ["a"]}, index=[0]), **kw)
    with pytest.raises(ConfigError, match="longer than 512"):
        neuronpedia_json(found, labels={0: "x" * 513}, **kw)
    with pytest.raises(ConfigError, match="more than once"):
        neuronpedia_json(found, latents=[0, 0], **kw)
    dead = [f for f in found.top.latents.tolist() if not fired(found, f)]
    if dead:
        with pytest.raises(ConfigError, match=f"latent {dead[0]} has no example"):
            neuronpedia_json(found, latents=[dead[0]], **kw)
    with pytest.raises(ConfigError, match="layout="):
        neuronpedia_json(found, layout="csv", **kw)
    with pytest.raises(ConfigError, match="model_id="):
        neuronpedia_json(found, model_id="my model", layer=1)
    with pytest.raises(ConfigError, match="layer="):
        neuronpedia_json(found, model_id="m", layer=-1)
    with pytest.raises(ConfigError, match="batch_size="):
        write_neuronpedia(tmp_path / "np", found, batch_size=129, **kw)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        write_neuronpedia(blocker / "sub" / "np", found, **kw)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not only batch files"):
        write_neuronpedia(busy, found, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "file"]
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    # a write the file system refuses (a full disk): the parents made for it are removed again
    def full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(vlmsae.export, "write_folder_atomic", full)
    monkeypatch.setattr(vlmsae.export, "write_text_atomic", full)
    for target in (tmp_path / "a" / "b" / "np", tmp_path / "a" / "b" / "one.json"):
        with pytest.raises(OSError, match="No space"):
            write_neuronpedia(target, found, **kw)
        assert not (tmp_path / "a").exists()
    # labels must not write anything when refused
    with pytest.raises(ConfigError):
        write_neuronpedia(tmp_path / "new" / "np", found, labels={3: "x"}, **kw)
    assert not (tmp_path / "new").exists()


def test_dashboard_shows_the_same_labels(built, tmp_path):
    _, _, found, images = built
    table = latent_table(found)
    labels = {0: HOSTILE[0], 2: "red circles"}
    data = dashboard_data(found, images, table=table, labels=labels)
    assert {f["id"]: f["label"] for f in data["latents"]} == {f: labels.get(f) for f in found.top.latents.tolist()}
    with pytest.raises(ConfigError, match=r"labels for latents \[1\]"):
        dashboard_data(found, images, table=table, labels={1: "odd"})
    page = write_dashboard(tmp_path / "d.html", found, images, table=table, labels=labels).read_text()
    assert script_json(HOSTILE[0]).strip('"') in page  # in the JSON the script renders as text
    assert HOSTILE[0] not in page
    assert 'el("span", {class: "label"}, f.label)' in page and '(f.label ? ": " + f.label : "")' in page
