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

from vlmsae.sae import SAE

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
