#!/usr/bin/env bash
# Builds the interop virtual environment (default: <repo>/.venv-interop) holding
# the peers vlmsae is checked against: sae-lens (pins transformer-lens < 4, so it
# cannot share the main environment) and EleutherAI sparsify (`eai-sparsify` on
# the package index; `sparsify` is an unrelated project).
# torch is pinned to the CPU build so that pip does not pull the CUDA wheels.
# Usage: tests/interop/setup_venv.sh [venv_dir]
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-$repo/.venv-interop}"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet torch==2.13.0
"$venv/bin/pip" install --quiet "sae-lens==6.54.12" "eai-sparsify==1.3.3" safetensors
"$venv/bin/python" -c "import sae_lens, sparsify, torch; print('interop venv ready:', torch.__version__, 'sae_lens', sae_lens.__version__)"
