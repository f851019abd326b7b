"""SAE folders (issue 3): exact round trips, the SAELens / sparsify layouts, and typed errors on bad files."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmsae.errors import NonFiniteError, SAEFileError
from vlmsae.sae import ARCHITECTURES, SAE
from vlmsae.saefile import _saelens_tensors

D_IN, D_SAE, K = 16, 64, 4
METADATA = {
    "hook_name": "blocks.9.hook_resid_post",
    "model_name": "tiny-llava",
    "model_class_name": "LlavaForConditionalGeneration",
    "hf_layer_path": "model.language_model.layers.9",
    "token_kinds": ["image", "text"],
}


def trained_like(kind: str, normalize: bool = True) -> SAE:
    """An SAE whose every tensor is non-trivial, with a non-unit input scale."""
    torch.manual_seed(0)
    sae = SAE(d_in=D_IN, d_sae=D_SAE, k=K, architecture=kind, normalize_activations=normalize, metadata=dict(METADATA))
    sae.init_from_batch(torch.randn(64, D_IN) * 20 + 3)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        if kind in ("jumprelu", "batchtopk"):
            sae.threshold.uniform_(0, 0.3)
    return sae


def snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_save_load_is_bitwise_exact(tmp_path, kind):
    sae = trained_like(kind)
    assert float(sae.act_scale) != 1.0
    sae.save(tmp_path / "sae")
    loaded = SAE.load(tmp_path / "sae")
    assert not loaded.training and loaded.cfg == sae.cfg
    assert loaded.metadata == METADATA
    before, after = sae.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    assert loaded.W_enc.stride() == sae.W_enc.stride()
    x = torch.randn(3, 7, D_IN) * 20
    sae.eval()
    for a, b in zip(sae(x), loaded(x), strict=True):
        assert torch.equal(a, b)


def test_saved_file_is_saelens_layout_with_own_tensors(tmp_path):
    sae = trained_like("topk")
    sae.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K and cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE
    assert cfg["dtype"] == "float32" and cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.9.hook_resid_post"
    with safe_open(tmp_path / "sae_weights.safetensors", "pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    assert shapes == {"W_enc": [D_IN, D_SAE], "b_enc": [D_SAE], "W_dec": [D_SAE, D_IN], "b_dec": [D_IN]}
    tensors = _saelens_tensors(sae.state_dict())
    storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
    params = {p.untyped_storage().data_ptr() for p in sae.parameters()}
    assert len(storages) == len(tensors) and not storages & params


def test_saved_weights_have_the_scale_folded_in(tmp_path):
    """A reader that knows nothing of vlmsae's scale (SAELens) must get the same outputs from the file."""
    sae = trained_like("topk").eval()
    sae.save(tmp_path)
    with safe_open(tmp_path / "sae_weights.safetensors", "pt") as f:
        W_enc, b_enc, W_dec, b_dec = (f.get_tensor(k) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    x = torch.randn(10, D_IN) * 20
    pre = (x - b_dec) @ W_enc + b_enc
    values, indices = pre.topk(K, dim=-1)
    latents = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    torch.testing.assert_close(latents, sae.encode(x))
    torch.testing.assert_close(latents @ W_dec + b_dec, sae.decode(latents))


def test_batchtopk_is_saved_as_jumprelu_with_its_threshold(tmp_path):
    sae = trained_like("batchtopk")
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["vlmsae"]["config"]["architecture"] == "batchtopk"
    assert SAE.load(tmp_path).cfg.architecture == "batchtopk"


def test_save_overwrites_atomically_and_leaves_no_temp_files(tmp_path, monkeypatch):
    first, second = trained_like("topk"), trained_like("relu")
    first.save(tmp_path)
    before = snapshot(tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("vlmsae.saefile.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        second.save(tmp_path)
    assert snapshot(tmp_path) == before  # the old SAE is intact, no temp file left
    monkeypatch.undo()
    second.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert SAE.load(tmp_path).cfg.architecture == "relu"


def test_save_refuses_nan_and_bad_metadata_without_writing(tmp_path):
    sae = trained_like("topk")
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="W_dec"):
        sae.save(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    sae = trained_like("topk")
    sae.metadata["bad"] = {1, 2}
    with pytest.raises(SAEFileError, match="metadata"):
        sae.save(tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_loads_a_sparsify_folder(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "layers.9"
    folder.mkdir()
    W_dec = torch.nn.functional.normalize(torch.randn(D_SAE, D_IN), dim=1)
    tensors = {"encoder.weight": torch.randn(D_SAE, D_IN), "encoder.bias": torch.randn(D_SAE) * 0.1,
               "W_dec": W_dec, "b_dec": torch.randn(D_IN)}
    save_file(tensors, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": 0, "k": K,
        "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN,
    }))
    sae = SAE.load(folder)
    assert (sae.cfg.architecture, sae.cfg.d_sae, sae.cfg.k) == ("topk", D_SAE, K)
    assert sae.metadata["hook_name"] == "blocks.9.hook_resid_post"
    x = torch.randn(5, D_IN)
    # sparsify: relu(linear(x - b_dec)), top-k, then sum of the chosen decoder rows + b_dec.
    pre = torch.relu((x - tensors["b_dec"]) @ tensors["encoder.weight"].T + tensors["encoder.bias"])
    values, indices = pre.topk(K, dim=-1)
    recon = (values[..., None] * W_dec[indices]).sum(1) + tensors["b_dec"]
    torch.testing.assert_close(sae(x).recon, recon)


# --- bad files: a typed error naming the file and key, nothing changed ---------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    trained_like("jumprelu").save(tmp_path)
    return tmp_path


def edit_cfg(folder: Path, change) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    change(cfg)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def delete(key):
    return lambda cfg: cfg.pop(key)


def put(key, value):
    return lambda cfg: cfg.__setitem__(key, value)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (delete("d_sae"), "missing key 'd_sae'"),
        (delete("architecture"), "missing key 'architecture'"),
        (put("architecture", "gated"), "key 'architecture' = 'gated' is not supported"),
        (put("dtype", "float33"), "key 'dtype' = 'float33' is not a dtype"),
        (put("d_in", "16"), "key 'd_in' = '16' has the wrong type"),
        (put("d_sae", 10**9), "key 'W_enc' has shape"),
        (put("normalize_activations", "layer_norm"), "key 'normalize_activations' = 'layer_norm'"),
        (put("dtype", "bfloat16"), "tensors are float32 but key 'dtype'"),
        (lambda cfg: cfg["vlmsae"]["config"].__setitem__("kind", "topk"), "disagrees with 'architecture'"),
        (lambda cfg: cfg["vlmsae"].__setitem__("act_scale", 0.3), "must be a positive power of two"),
    ],
)
def test_bad_config_is_a_typed_error_naming_file_and_key(saved, change, fragment):
    edit_cfg(saved, change)
    before = snapshot(saved)
    with pytest.raises(SAEFileError, match="cfg.json|sae_weights") as err:
        SAE.load(saved)
    assert fragment in str(err.value) and str(saved) in str(err.value)
    assert snapshot(saved) == before


def test_topk_config_without_k(tmp_path):
    trained_like("topk").save(tmp_path)
    edit_cfg(tmp_path, delete("k"))
    with pytest.raises(SAEFileError, match="missing key 'k'"):
        SAE.load(tmp_path)


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda data: data[: len(data) - 10], "not a readable safetensors file"),
        (lambda data: b"\xff" * 8 + data[8:], "not a readable safetensors file"),
        (lambda data: data[:4], "not a readable safetensors file"),
        (lambda data: b"", "not a readable safetensors file"),
    ],
)
def test_corrupt_weights_are_a_typed_error(saved, damage, fragment):
    weights = saved / "sae_weights.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    before = snapshot(saved)
    with pytest.raises(SAEFileError, match=fragment) as err:
        SAE.load(saved)
    assert str(weights) in str(err.value)
    assert snapshot(saved) == before


def test_weights_that_disagree_with_the_config(saved):
    weights = saved / "sae_weights.safetensors"
    with safe_open(weights, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, "W_dec": tensors["W_dec"][:, :-1].contiguous()}, weights)
    with pytest.raises(SAEFileError, match=r"key 'W_dec' has shape \[64, 15\], config says \[64, 16\]"):
        SAE.load(saved)
    save_file({k: v for k, v in tensors.items() if k != "threshold"}, weights)
    with pytest.raises(SAEFileError, match=r"missing \['threshold'\]"):
        SAE.load(saved)


def test_not_json_missing_files_and_not_a_folder(tmp_path):
    with pytest.raises(SAEFileError, match="no such folder"):
        SAE.load(tmp_path / "nope")
    with pytest.raises(SAEFileError, match="cfg.json: missing"):
        SAE.load(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFileError, match="not valid JSON"):
        SAE.load(tmp_path)
    (tmp_path / "cfg.json").write_text("[1, 2]")
    with pytest.raises(SAEFileError, match="must hold a JSON object"):
        SAE.load(tmp_path)
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(SAEFileError, match="holds neither"):
        SAE.load(tmp_path)
    some_file = tmp_path / "file"
    some_file.write_text("x")
    with pytest.raises(SAEFileError, match="not a folder"):
        trained_like("topk").save(some_file)


def test_sparsify_features_we_cannot_represent(tmp_path):
    folder = tmp_path / "layers.0"
    folder.mkdir()
    save_file({"encoder.weight": torch.zeros(8, 4), "encoder.bias": torch.zeros(8), "W_dec": torch.zeros(8, 4),
               "b_dec": torch.zeros(4), "W_skip": torch.zeros(4, 4)}, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"d_in": 4, "num_latents": 8, "k": 2, "skip_connection": True}))
    with pytest.raises(SAEFileError, match="key 'skip_connection' = True is not supported"):
        SAE.load(folder)
