#!/usr/bin/env bash
# What a session lent the GPU machine runs there, in one device call (at most 600 s a command): the GPU figures
# (issue 17 item 4, with the CUDA overlap of item 2 in section c), the GPU scaling curves (item 5), then the long
# SynthSAEBench Matryoshka run (issue 15) on the time that is left. Figures and logs land in $OUT, which the device
# tool brings back (7 files); the machine's facts in machine.txt. Then write them into benchmarks/RESULTS.md.
#
#   here, first:  bash benchmarks/gpu_wheels.sh     # the wheels the GPU image lacks, into .whl (git-ignored)
#   device run:   command "bash benchmarks/gpu_session.sh", carry [".whl"], timeout_s 600
#
# Each step has its own time limit, so one that hangs leaves the others their time; SECONDS_TOTAL (default 560)
# is what the whole script may take.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_session}"
total="${SECONDS_TOTAL:-560}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "no wheels to install: run benchmarks/gpu_wheels.sh here and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
{ date -u +%Y-%m-%dT%H:%MZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
  git log -1 --format=%h 2>/dev/null; } > "$out/machine.txt" 2>&1

timeout 330 python3 benchmarks/gpu_figures.py --budget-s 240 --out "$out/gpu.json" > "$out/gpu.log" 2>&1
tail -60 "$out/gpu.log"
# d_in 2048, batch 4096: at a million latents the weights, Adam's state and the pre-activations stay near 70 GB
(cd benchmarks && timeout 120 python3 scaling.py --device cuda --d-in 2048 --batch 4096 \
    --d-sae 16384 65536 262144 1048576 --d-model 1024 --out "$out/scaling") > "$out/scaling.log" 2>&1
tail -20 "$out/scaling.log"
# the rest of the call, less about a minute for the synthetic model's build and the held-out scores
left=$(( total - SECONDS - 60 ))
if (( left > 30 )); then
    timeout $(( left + 90 )) python3 benchmarks/synth_sae_bench.py --device cuda --no-saelens --kinds matryoshka \
        --samples 200000000 --chunk 262144 --draw-batch 16384 --score-every 25000000 --budget-s "$left" \
        --json "$out/synth.json" > "$out/synth.log" 2>&1
    tail -30 "$out/synth.log"
else
    echo "no time left for the SynthSAEBench run ($left s)"
fi
