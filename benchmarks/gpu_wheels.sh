#!/usr/bin/env bash
# Fills <repo>/.whl (git-ignored) with the wheels that the lent GPU machine lacks, so that one Python
# process there can run benchmarks/gpu_figures.py (vlmsae beside eai-sparsify and sae-lens) and
# benchmarks/synth_sae_bench.py --device cuda (vlmsae beside sae_lens and sae_lens.synthetic). Run it here,
# where pip reaches the package index; the GPU machine has none. The device call then names .whl in
# `carry`, and there:
#
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
#
# vlmsae itself comes from the repo root (PYTHONPATH .), not from a wheel.
#
# The GPU machine's image: Python 3.12, x86_64 Linux, torch 2.11.0+cu130, transformers 5.17.0, tokenizers
# 0.23.2, safetensors 0.8.0, accelerate 1.15.0, numpy 2.5.2, huggingface_hub 1.33.0, jaxtyping 0.3.11, and
# pandas, pyarrow, fsspec, xxhash, protobuf, narwhals, scipy, sentencepiece, requests, rich, pyyaml, click, ...
# None of those is carried (the image's CUDA torch must stay). Carried: what `import vlmsae, sparsify,
# sae_lens, sae_lens.synthetic` and the two benchmarks import that the image lacks, pinned to versions that
# accept the image's:
#   - plotly (vlmsae's figures);
#   - eai-sparsify 1.3.3 and sae-lens 6.54.12 (the peers), transformer-lens 3.x (sae-lens needs < 4; 3.9.0
#     wants transformers >= 5.9), datasets 5.0.1 (the last that accepts huggingface_hub 1.x with pyarrow >= 21)
#     with dill / multiprocess, and the peers' small import-time needs;
#   - wandb, which sae-lens imports at import time (gpu_figures.py stubs it when absent, but
#     synth_sae_bench_peer.py does not), with what `import wandb` loads: pydantic and opentelemetry.
#     wandb 0.31 selects its protobuf code for protobuf 5, 6 or 7; googleapis-common-protos 1.74.0's code
#     was generated with protobuf 4.25, so it loads under any newer protobuf the image has.
# Wheels whose names are no longer in the list are removed from .whl, so each package stays at one version.
#
# Usage: bash benchmarks/gpu_wheels.sh
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
dest="$repo/.whl"

wheels=(
  # vlmsae
  plotly==7.1.0
  # the peers
  eai-sparsify==1.3.3
  sae-lens==6.54.12
  transformer-lens==3.9.0
  better-abc==0.0.3
  datasets==5.0.1
  dill==0.4.1
  multiprocess==0.70.19
  natsort==8.4.0
  schedulefree==1.4.1
  simple-parsing==0.1.9
  docstring-parser==0.18.0
  # wandb (sae-lens imports it) and what its import loads
  wandb==0.31.0
  platformdirs==4.14.9
  pydantic==2.12.5
  pydantic-core==2.41.5
  annotated-types==0.7.0
  typing-inspection==0.4.2
  googleapis-common-protos==1.74.0
  opentelemetry-api==1.45.2
  opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  opentelemetry-proto==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2
  opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-otlp-common==0.66b2
  opentelemetry-exporter-http-transport==0.66b2
)

# A distribution's name and version as wheel file names spell them (PEP 427: runs of -_. become _).
wheel_key() { echo "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'; }

mkdir -p "$dest"
declare -A wanted=()
for spec in "${wheels[@]}"; do
  wanted["$(wheel_key "${spec%%==*}")-${spec##*==}"]=1
done
shopt -s nullglob
for file in "$dest"/*.whl; do
  base="$(basename "$file")"
  IFS=- read -r name version _ <<<"$base"
  if [[ -z "${wanted["$(wheel_key "$name")-$version"]:-}" ]]; then
    echo "removing $base (not in the list)"
    rm -f "$file"
  fi
done

for spec in "${wheels[@]}"; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$spec" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
done

files=("$dest"/*.whl)
if (( ${#files[@]} != ${#wheels[@]} )); then
  echo "expected ${#wheels[@]} wheels in $dest, found ${#files[@]}" >&2
  exit 1
fi
bytes=$(cat "${files[@]}" | wc -c)
echo "${#files[@]} wheels in $dest, $(awk -v b="$bytes" 'BEGIN { printf "%.1f MiB", b / 1048576 }') in all"
