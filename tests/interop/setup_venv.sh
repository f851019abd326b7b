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
quiet_pip() {  # pip's notes about unused local index folders are noise here
  "$venv/bin/pip" install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
quiet_pip --upgrade pip
quiet_pip torch==2.13.0
quiet_pip "sae-lens==6.54.12" "eai-sparsify==1.3.3" safetensors
# vlmsae's own needs beside the peers' (pillow is the one missing), so that vlmsae and sae-lens can share one process
# as they do on the GPU machine (benchmarks/synth_sae_bench.py --in-process, with PYTHONPATH at the repo)
quiet_pip pillow
"$venv/bin/python" -c "import sae_lens, sparsify, torch; print('interop venv ready:', torch.__version__, 'sae_lens', sae_lens.__version__)"
