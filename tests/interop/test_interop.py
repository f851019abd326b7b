"""vlmsae SAE folders against the real peers (issue 3), each peer in the interop venv.

sae-lens pins transformer-lens < 4, so it cannot live in the main environment:
`tests/interop/setup_venv.sh` builds `.venv-interop` (or point VLMSAE_INTEROP_PYTHON
at another interpreter that has sae-lens and eai-sparsify). Without it these tests skip.
All peer work runs in one subprocess per session (its imports take seconds).
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlmsae
from vlmsae.sae import SAE
from vlmsae.sae import Transcoder
from vlmsae.zoo import tiny_inputs, tiny_model

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]
PYTHON = Path(os.environ.get("VLMSAE_INTEROP_PYTHON", REPO / ".venv-interop" / "bin" / "python"))
D_IN, D_SAE, K = 16, 64, 4  # as in peers.py
OURS = ["topk", "batchtopk", "relu", "jumprelu"]
SAELENS = ["topk", "topk-training", "standard", "jumprelu"]

if not PYTHON.exists():
    pytest.skip(f"no interop venv at {PYTHON}; build it with tests/interop/setup_venv.sh", allow_module_level=True)


def our_sae(kind: str, x: torch.Tensor) -> SAE:
    torch.manual_seed(0)
    sae = SAE(d_in=D_IN, d_sae=D_SAE, k=K, architecture=kind, normalize_activations=True,
              metadata={"hook_name": "blocks.9.hook_resid_post", "model_name": "tiny"})
    sae.init_from_batch(x * 5)  # a non-unit input scale, folded into the file
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        if kind in ("jumprelu", "batchtopk"):
            sae.threshold.uniform_(0, 0.2)
    return sae


@pytest.fixture(scope="module")
def exchange(tmp_path_factory):
    """Write vlmsae folders, then let the peers read them and write their own, in one subprocess."""
    root = tmp_path_factory.mktemp("interop")
    x = torch.randn(50, D_IN, generator=torch.Generator().manual_seed(0)) * 3
    inputs = root / "inputs.safetensors"
    save_file({"x": x}, inputs)
    jobs = []
    for kind in OURS:
        our_sae(kind, x).save(root / f"ours-{kind}")
        jobs.append(["saelens-read", str(root / f"ours-{kind}"), str(inputs), str(root / f"ours-{kind}.out")])
    for arch in SAELENS:
        jobs.append(["saelens-write", str(root / f"saelens-{arch}"), arch, str(inputs), str(root / f"saelens-{arch}.out")])
    jobs.append(["sparsify-write", str(root / "layers.3"), str(inputs), str(root / "sparsify.out")])
    (root / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([str(PYTHON), str(Path(__file__).with_name("peers.py")), str(root / "jobs.json")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, x


def assert_same_outputs(sae: SAE, x: torch.Tensor, peer_out: dict[str, torch.Tensor]) -> None:
    out = sae.eval()(x)
    torch.testing.assert_close(out.latents, peer_out["latents"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(peer_out["latents"]), peer_out["recon"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.recon, peer_out["forward"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", OURS)
def test_saelens_opens_vlmsae_folders(exchange, kind):
    root, x = exchange
    assert_same_outputs(our_sae(kind, x), x, load_file(root / f"ours-{kind}.out"))


@pytest.mark.parametrize("architecture", SAELENS)
def test_vlmsae_opens_saelens_folders(exchange, architecture):
    root, x = exchange
    sae = SAE.load(root / f"saelens-{architecture}")
    assert sae.metadata["hook_name"] == "blocks.3.hook_resid_post"
    assert_same_outputs(sae, x, load_file(root / f"saelens-{architecture}.out"))


def test_vlmsae_opens_sparsify_folders(exchange):
    root, x = exchange
    sae = SAE.load(root / "layers.3")
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.d_sae) == ("topk", K, D_SAE)
    assert sae.metadata["hook_name"] == "blocks.3.hook_resid_post"
    assert_same_outputs(sae, x, load_file(root / "sparsify.out"))


def our_transcoder(d: int) -> Transcoder:
    """A JumpReLU transcoder reading width d and writing d - 16 (widths that differ: SAELens must see its d_out)."""
    torch.manual_seed(0)
    tc = Transcoder(d_in=d, d_sae=4 * d, d_out=d - 16, metadata={"hook_name": "blocks.1.hook_mlp_in",
                                                          "hook_name_out": "blocks.1.hook_mlp_out"})
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.1)
        tc.b_dec.normal_(0, 0.1)
        tc.threshold.uniform_(0, 0.3)
    return tc.eval()


@pytest.fixture(scope="module")
def gemma_scope(tmp_path_factory):
    """Gemma Scope 2 style folders (issue 14, item 4) that SAELens writes for layer 1 of a tiny Gemma 3, with its
    outputs on that layer's activations (resid_post for the SAE, the MLP's input for the transcoder); and SAELens'
    outputs from a vlmsae transcoder folder. One subprocess."""
    root = tmp_path_factory.mktemp("gemma-scope")
    model = tiny_model("gemma3")
    inputs = tiny_inputs(model, 2)
    with torch.no_grad(), vlmsae.record(model, "blocks.1.hook_resid_post") as resid, \
            vlmsae.record(model, "blocks.1.hook_mlp_in") as mlp_in:
        model(**inputs)
    jobs = []
    for kind, rec in (("sae", resid), ("transcoder", mlp_in)):
        save_file({"x": rec[1].reshape(-1, rec[1].shape[-1]).contiguous()}, root / f"{kind}-in.safetensors")
        jobs.append(["gemma-scope-write", str(root / kind), kind, str(root / f"{kind}-in.safetensors"),
                     str(root / f"{kind}.out")])
    our_transcoder(mlp_in[1].shape[-1]).save(root / "ours-transcoder")
    jobs.append(["saelens-read", str(root / "ours-transcoder"), str(root / "transcoder-in.safetensors"),
                 str(root / "ours-transcoder.out")])
    (root / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([str(PYTHON), str(Path(__file__).with_name("peers.py")), str(root / "jobs.json")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, model, inputs


def test_gemma_scope_jumprelu_from_saelens_gives_the_same_latents(gemma_scope):
    """Opened from SAELens' folder and attached where its metadata says, on the activations there."""
    root, model, inputs = gemma_scope
    sae = SAE.load(root / "sae")
    assert (sae.cfg.architecture, sae.cfg.apply_b_dec_to_input) == ("jumprelu", False)
    assert sae.metadata["hf_hook_name"] == "model.layers.1.output"
    peer = load_file(root / "sae.out")
    assert 0 < peer["latents"].count_nonzero() < peer["latents"].numel() / 2  # sparse, not trivially so
    assert_same_outputs(sae, load_file(root / "sae-in.safetensors")["x"], peer)
    with torch.no_grad(), vlmsae.splice(model, None, sae) as s:  # at blocks.1.hook_resid_post
        model(**inputs)
    torch.testing.assert_close(s.latents.reshape(peer["latents"].shape), peer["latents"], rtol=1e-5, atol=1e-5)


def test_gemma_scope_transcoder_from_saelens_gives_the_same_latents_and_outputs(gemma_scope):
    root, model, inputs = gemma_scope
    tc = SAE.load(root / "transcoder")
    assert type(tc) is Transcoder and tc.cfg.d_out == model.config.text_config.hidden_size
    assert (tc.metadata["hook_name"], tc.metadata["hook_name_out"]) == ("blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out")
    peer = load_file(root / "transcoder.out")
    assert 0 < peer["latents"].count_nonzero() < peer["latents"].numel() / 2
    assert_same_outputs(tc, load_file(root / "transcoder-in.safetensors")["x"], peer)
    with torch.no_grad():
        clean = model(**inputs).logits
        with vlmsae.splice(model, None, tc, use_error_term=True) as s:  # reads mlp_in, writes mlp_out of layer 1
            assert torch.equal(model(**inputs).logits, clean)
    torch.testing.assert_close(s.latents.reshape(peer["latents"].shape), peer["latents"], rtol=1e-5, atol=1e-5)


def test_saelens_opens_vlmsae_transcoder_folders(gemma_scope):
    root, _, _ = gemma_scope
    x = load_file(root / "transcoder-in.safetensors")["x"]
    assert_same_outputs(our_transcoder(x.shape[-1]), x, load_file(root / "ours-transcoder.out"))
