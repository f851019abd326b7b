"""The prepared GPU script (benchmarks/gpu_figures.py) runs on the CPU at toy sizes, so that the script a lent GPU
runs has run before: its checks pass and each section leaves its figures in the JSON. Section d (two gloo ranks of
bench_distributed.py) is left to test_distributed.py, which runs the same two-rank step."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_figures_runs_its_sections_at_toy_sizes_with_their_checks_passing(tmp_path):
    out = tmp_path / "gpu.json"
    command = [sys.executable, "benchmarks/gpu_figures.py", "--tiny", "--device", "cpu", "--sections", "a", "b", "c",
               "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "check FAIL" not in done.stdout, done.stdout[-3000:]
    figures = json.loads(out.read_text())
    for section in ("sae_step", "hooks", "online_train"):
        checks = figures[section]["checks"]
        assert checks and all(c["ok"] for c in checks.values()), (section, checks)
    train = figures["online_train"]
    assert not train["failed"] and train["train_tokens_per_s"] > 0 and train["plain_tokens_per_s"] > 0
    assert train["overlap_gain"] > 0 and train["harvest_tokens_per_s"] > 0
