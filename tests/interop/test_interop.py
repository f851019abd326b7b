"""vlmsae SAE folders against the real peers (issue 3), each peer in the interop venv.

sae-lens pins transformer-lens < 4, so it cannot live in the main environment:
`tests/interop/setup_venv.sh` builds `.venv-interop` (or point VLMSAE_INTEROP_PYTHON
at another interpreter that has sae-lens and eai-sparsify). Without it these tests skip.
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmsae.sae import SAE

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]
PYTHON = Path(os.environ.get("VLMSAE_INTEROP_PYTHON", REPO / ".venv-interop" / "bin" / "python"))
PEERS = Path(__file__).with_name("peers.py")
D_IN, D_SAE, K = 16, 64, 4  # as in peers.py

if not PYTHON.exists():
    pytest.skip(f"no interop venv at {PYTHON}; build it with tests/interop/setup_venv.sh", allow_module_level=True)


def peer(*args) -> None:
    result = subprocess.run([str(PYTHON), str(PEERS), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture
def inputs(tmp_path) -> tuple[torch.Tensor, Path]:
    x = torch.randn(50, D_IN, generator=torch.Generator().manual_seed(0)) * 3
    path = tmp_path / "inputs.safetensors"
    save_file({"x": x}, path)
    return x, path


def assert_same_outputs(sae: SAE, x: torch.Tensor, peer_out: dict[str, torch.Tensor]) -> None:
    out = sae.eval()(x)
    torch.testing.assert_close(out.latents, peer_out["latents"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(peer_out["latents"]), peer_out["recon"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.recon, peer_out["forward"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "relu", "jumprelu"])
def test_saelens_opens_vlmsae_folders(tmp_path, inputs, kind):
    x, inputs_path = inputs
    torch.manual_seed(0)
    sae = SAE(d_in=D_IN, d_sae=D_SAE, k=K, kind=kind, normalize_activations=True,
              metadata={"hook_name": "blocks.9.hook_resid_post", "model_name": "tiny"})
    sae.init_from_batch(x * 5)  # a non-unit input scale, folded into the file
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        if kind in ("jumprelu", "batchtopk"):
            sae.threshold.uniform_(0, 0.2)
    sae.save(tmp_path / "sae")
    peer("saelens-read", tmp_path / "sae", inputs_path, tmp_path / "out.safetensors")
    assert_same_outputs(sae, x, load_file(tmp_path / "out.safetensors"))


@pytest.mark.parametrize("architecture", ["topk", "topk-training", "standard", "jumprelu"])
def test_vlmsae_opens_saelens_folders(tmp_path, inputs, architecture):
    x, inputs_path = inputs
    peer("saelens-write", tmp_path / "sae", architecture, inputs_path, tmp_path / "out.safetensors")
    sae = SAE.load(tmp_path / "sae")
    assert sae.metadata["hook_name"] == "blocks.3.hook_resid_post"
    assert_same_outputs(sae, x, load_file(tmp_path / "out.safetensors"))


def test_vlmsae_opens_sparsify_folders(tmp_path, inputs):
    x, inputs_path = inputs
    peer("sparsify-write", tmp_path / "layers.3", inputs_path, tmp_path / "out.safetensors")
    sae = SAE.load(tmp_path / "layers.3")
    assert (sae.cfg.kind, sae.cfg.k, sae.cfg.d_sae) == ("topk", K, D_SAE)
    assert sae.metadata["hook_name"] == "blocks.3.hook_resid_post"
    assert_same_outputs(sae, x, load_file(tmp_path / "out.safetensors"))
