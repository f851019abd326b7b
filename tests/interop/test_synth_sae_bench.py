"""benchmarks/synth_sae_bench.py end to end on a tiny synthetic model (issue 15 item 5): SAELens builds the model,
draws the samples, trains its two SAEs beside vlmsae's and scores all four folders. Skips without the interop venv."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]
PYTHON = Path(os.environ.get("VLMSAE_INTEROP_PYTHON", REPO / ".venv-interop" / "bin" / "python"))
K = 4

if not PYTHON.exists():
    pytest.skip(f"no interop venv at {PYTHON}; build it with tests/interop/setup_venv.sh", allow_module_level=True)


def test_synth_sae_bench_scores_both_sides_with_saelens(tmp_path):
    out = tmp_path / "scores.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "synth_sae_bench.py"), "--model", "tiny", "--samples", "2048",
         "--width", "64", "--k", str(K), "--eval-samples", "2048", "--chunk", "1024", "--threads", "1",
         "--cache", str(tmp_path / "cache"), "--interop-python", str(PYTHON), "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-4000:]
    scores = json.loads(out.read_text())["scores"]
    assert {(r["impl"], r["kind"], r["encode"]) for r in scores} == {
        (impl, kind, encode) for impl in ("vlmsae", "SAELens") for kind in ("batchtopk", "matryoshka")
        for encode in ("batch top-k", "threshold")}
    for r in scores:
        assert 0 < r["mcc"] <= 1 and 0 <= r["f1"] <= 1 and 0 < r["uniqueness"] <= 1 and 0 <= r["dead"] <= 64
        assert r["samples"] == 2048 and r["seconds"] > 0
        if r["encode"] == "batch top-k":  # SAELens's batch top-k on the saved weights keeps k per sample on average
            assert r["l0"] == pytest.approx(K)
    assert "| matryoshka | vlmsae | batch top-k | 2,048 |" in result.stdout


def test_a_long_run_scores_and_keeps_its_state_where_chunks_pass_each_multiple_of_score_every(tmp_path):
    """--score-every need not be a multiple of --chunk: 1500 with chunks of 1024 scores after 2048 and 3072 samples
    (and at the end, 4096), and --state holds each of them."""
    out, state = tmp_path / "scores.json", tmp_path / "state"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "synth_sae_bench.py"), "--model", "tiny", "--samples", "4096",
         "--width", "64", "--k", str(K), "--eval-samples", "1024", "--chunk", "1024", "--threads", "1",
         "--no-saelens", "--kinds", "matryoshka", "--score-every", "1500", "--state", str(state),
         "--cache", str(tmp_path / "cache"), "--interop-python", str(PYTHON), "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-4000:]
    scores = json.loads(out.read_text())["scores"]
    assert sorted({r["samples"] for r in scores}) == [2048, 3072, 4096]
    assert json.loads((state / "state.json").read_text())["samples"] == 4096


def test_a_run_stopped_right_after_a_saved_state_resumes_as_if_never_stopped(tmp_path, monkeypatch):
    """The worker draws the next chunk while vlmsae trains (without SAELens's trainers), but the saved stream never
    runs ahead of the samples trained: a run stopped just after its state at 2048 samples, resumed to 4096, ends
    where 4096 straight through ends (the same samples, in order)."""
    common = ["--model", "tiny", "--width", "64", "--k", str(K), "--eval-samples", "1024", "--chunk", "512",
              "--batch", "256", "--threads", "1", "--no-saelens", "--kinds", "matryoshka",
              "--cache", str(tmp_path / "cache"), "--interop-python", str(PYTHON)]

    def run(name: str, *extra: str) -> dict:
        out = tmp_path / f"{name}.json"
        result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "synth_sae_bench.py"), *common,
                                 "--samples", "4096", "--json", str(out), *extra],
                                capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr[-4000:]
        return {r["encode"]: r for r in json.loads(out.read_text())["scores"] if r["samples"] == 4096}

    spec = importlib.util.spec_from_file_location("synth_sae_bench", REPO / "benchmarks" / "synth_sae_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    save_state = bench.Bench.save_state

    def save_then_stop(self):  # the user's Ctrl-C just after the first state is written
        save_state(self)
        raise KeyboardInterrupt

    state = tmp_path / "state"
    monkeypatch.setattr(bench.Bench, "save_state", save_then_stop)
    monkeypatch.setattr(sys, "argv", ["synth_sae_bench.py", *common, "--samples", "4096", "--score-every", "2048",
                                      "--state", str(state)])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(KeyboardInterrupt):
            bench.main()
    finally:
        torch.set_num_threads(threads)
    assert json.loads((state / "state.json").read_text())["samples"] == 2048

    straight, resumed = run("straight"), run("resumed", "--state", str(state))
    for encode, row in straight.items():
        for metric in ("mcc", "f1", "explained_variance", "l0", "dead"):
            assert resumed[encode][metric] == pytest.approx(row[metric], abs=1e-6), (encode, metric)


def test_in_process_scores_as_the_interop_worker_does(tmp_path):
    """--in-process (how the GPU machine runs it: sae_lens and vlmsae in one interpreter, chunks handed over as
    tensors) draws, trains and scores exactly as the worker in the interop venv does, both sides training."""
    def run(python: Path, name: str, *extra: str) -> list:
        out = tmp_path / f"{name}.json"
        result = subprocess.run(
            [str(python), str(REPO / "benchmarks" / "synth_sae_bench.py"), "--model", "tiny", "--samples", "2048",
             "--width", "64", "--k", str(K), "--eval-samples", "1024", "--chunk", "1024", "--threads", "1",
             "--cache", str(tmp_path / "cache"), "--interop-python", str(PYTHON), "--json", str(out), *extra],
            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr[-4000:]
        return {(r["impl"], r["kind"], r["encode"]): r for r in json.loads(out.read_text())["scores"]}

    # the worker's side runs this suite's torch, which may be older than the interop venv's: float32 sums may differ
    # in their last bits, while another sample stream moves MCC and F1 in the third or fourth decimal
    worker = run(Path(sys.executable), "worker", "--draw-batch", "512")
    in_process = run(PYTHON, "in_process", "--in-process", "--draw-batch", "512")
    assert len(worker) == 8 and in_process.keys() == worker.keys()
    for key, row in worker.items():
        for metric in ("mcc", "f1", "explained_variance", "dead"):
            assert in_process[key][metric] == pytest.approx(row[metric], rel=1e-5, abs=1e-6), (key, metric)


def test_a_time_budget_ends_the_run_after_the_chunk_under_way_and_scores_there(tmp_path):
    out = tmp_path / "scores.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "synth_sae_bench.py"), "--model", "tiny", "--samples", "8192",
         "--width", "64", "--k", str(K), "--eval-samples", "1024", "--chunk", "1024", "--threads", "1", "--no-saelens",
         "--kinds", "matryoshka", "--budget-s", "1e-9", "--cache", str(tmp_path / "cache"),
         "--interop-python", str(PYTHON), "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-4000:]
    assert {r["samples"] for r in json.loads(out.read_text())["scores"]} == {1024}
