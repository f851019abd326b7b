"""SAELens's side of synth_sae_bench.py: runs inside the interop venv (sae-lens), never imports vlmsae.

    python synth_sae_bench_peer.py    # then one JSON request per line on stdin, one JSON answer per line on stdout

Where sae_lens imports beside vlmsae (on the GPU machine, with the carried wheels), synth_sae_bench.py uses the
``Peer`` class below in its own process instead (``--in-process``, implied by a ``--device`` other than cpu):
the same requests as method calls, the chunks handed over as tensors on the device rather than files.

The synthetic model is SynthSAEBench-16k's, built from its published config (SAELens docs,
``synth_sae_bench.md``; arXiv 2602.14687) by SAELens's own ``SyntheticModel`` and cached on disk,
since its orthogonalisation takes the better part of an hour on two CPU cores. SAELens's own SAEs
train with its own ``SAETrainer`` at the settings of its ``SyntheticSAERunnerConfig`` (the
benchmark's: batch 1024, lr 3e-4 constant, dead window 1000 steps) and the experiments' recipe
(Matryoshka widths 128 / 512 / 2048 / 4096 with its Matryoshka AuxK). Scores come from SAELens's
own ``eval_sae_on_synthetic_data``, fed one held-out sample set shared by every SAE.

Requests, answered in order:
    {"op": "build", "model": "16k" | "tiny", "cache": DIR}           build or load the synthetic model
    {"op": "setup", "width", "k", "samples", "batch", "lr", "seed", "kinds", "draw_batch"}
                                                                     SAELens's trainers of those kinds
    {"op": "eval_set", "samples", "seed"}                            draw the held-out samples
    {"op": "chunk", "n", "path"}                                     draw the next n training samples into PATH ("x")
    {"op": "train", "kind", "path"}                                  SAELens's trainer on PATH's samples; seconds
    {"op": "save", "folders": {kind: DIR}}                           SAELens's inference folders (JumpReLU)
    {"op": "score", "saes": [[name, DIR, k], ...]}                   SAELens's evaluation of each folder, twice
"""

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import sae_lens
from sae_lens.synthetic import (
    FoldedNormalMagnitudeConfig,
    HierarchyConfig,
    LinearMagnitudeConfig,
    LowRankCorrelationConfig,
    OrthogonalizationConfig,
    SyntheticModel,
    SyntheticModelConfig,
    SyntheticSAERunnerConfig,
    ZipfianFiringProbabilityConfig,
    eval_sae_on_synthetic_data,
)
from sae_lens.training.sae_trainer import SAETrainer

def matryoshka_inner(width: int) -> list[int]:
    """Inner Matryoshka widths: the benchmark experiments' 128, 512, 2048 at width 4096 (synth-sae-bench-experiments,
    sweeps/common.py), in proportion at other widths."""
    return sorted({w for w in (width // 32, width // 8, width // 2) if w >= 1})


def model_config(name: str) -> SyntheticModelConfig:
    """SynthSAEBench-16k's published config, or ("tiny") the same recipe shrunk for smoke tests."""
    if name == "16k":
        return SyntheticModelConfig(
            num_features=16_384, hidden_dim=768,
            firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
            hierarchy=HierarchyConfig(total_root_nodes=128, branching_factor=4, max_depth=3,
                                      mutually_exclusive_portion=1.0, mutually_exclusive_min_depth=0,
                                      compensate_probabilities=True, scale_children_by_parent=True),
            orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
            correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
            mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
            std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
            bias=0.5, seed=42)
    if name == "tiny":
        return SyntheticModelConfig(
            num_features=512, hidden_dim=32,
            firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-3),
            hierarchy=HierarchyConfig(total_root_nodes=4, branching_factor=4, max_depth=3,
                                      mutually_exclusive_portion=1.0, mutually_exclusive_min_depth=0,
                                      compensate_probabilities=True, scale_children_by_parent=True),
            orthogonalization=OrthogonalizationConfig(num_steps=5, lr=3e-4),
            correlation=LowRankCorrelationConfig(rank=4, correlation_scale=0.1),
            mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
            std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
            bias=0.5, seed=42)
    raise SystemExit(f"unknown synthetic model {name!r}; use 16k or tiny")


class Replay:
    """The held-out samples, served back batch by batch: ``eval_sae_on_synthetic_data`` takes it both as the
    activation generator (``sample(n)``: the next batch's feature activations, dense) and as the feature dictionary
    (``feature_vectors``; called on a batch: that batch's hidden activations), so every SAE sees the same samples."""

    def __init__(self, model: SyntheticModel, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.feature_vectors = model.feature_dict.feature_vectors
        self.batches, self.at = batches, 0

    def sample(self, n: int) -> torch.Tensor:
        features = self.batches[self.at][1]
        assert features.shape[0] == n, "score with the batch size the eval set was drawn with"
        return features.to_dense()

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.batches[self.at][0]
        self.at += 1
        return hidden


class Peer:
    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self.model = self.trainers = self.eval_batches = None
        self.stream = None  # RNG state of the training sample stream, kept apart from everything else
        self.draw_batch = None

    def rng(self):
        """A fork of the RNG that draws the samples: the CPU's, or the GPU's where the model lives on one."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def rng_state(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def build(self, model: str, cache: str) -> dict:
        cfg = model_config(model)
        folder = Path(cache) / f"synth-sae-bench-{model}-seed{cfg.seed}"
        start = time.perf_counter()
        saved = folder / "synthetic_model_config.json"
        if saved.is_file() and json.loads(saved.read_text()) == json.loads(json.dumps(cfg.to_dict())):
            self.model = SyntheticModel.load_from_disk(folder, device=str(self.device))
            built = False
        else:
            self.model = SyntheticModel(cfg, device=str(self.device))
            self.model.save(folder)
            built = True
        return {"d_in": cfg.hidden_dim, "num_features": cfg.num_features, "built": built,
                "seconds": time.perf_counter() - start, "folder": str(folder)}

    @torch.no_grad()
    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (n, d_in), feature activations (n, num_features) sparse): SyntheticModel.sample_with_features,
        the features passed to the dictionary as a sparse tensor (its own sparse path: the same sum, 8x faster
        here). Its generator's sparse output (use_sparse_tensors) is slower still: 17 s per 1024 samples against 1 s."""
        features = self.model.activation_generator.sample(n).to_sparse()
        return self.model.feature_dict(features), features

    def setup(self, width: int, k: int, samples: int, batch: int, lr: float, seed: int,
              kinds: tuple[str, ...] = ("batchtopk", "matryoshka"), draw_batch: int | None = None) -> dict:
        """SAELens's trainers; training samples are drawn ``draw_batch`` at a time (default: the batch; more on a
        GPU, where a draw of 1024 is launch-bound: the samples are independent, so only the stream's order changes)."""
        d_in = self.model.cfg.hidden_dim
        configs = {
            "batchtopk": sae_lens.BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=width, k=k, device=str(self.device)),
            "matryoshka": sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=d_in, d_sae=width, k=k, matryoshka_widths=[*matryoshka_inner(width), width],
                use_matryoshka_aux_loss=True, device=str(self.device)),
        }
        self.trainers = {}
        for kind, sae_cfg in ((kind, configs[kind]) for kind in kinds):
            torch.manual_seed(seed)
            sae = (sae_lens.BatchTopKTrainingSAE if kind == "batchtopk" else sae_lens.MatryoshkaBatchTopKTrainingSAE)(sae_cfg)
            # The runner's own trainer settings (SyntheticSAERunnerConfig.to_sae_trainer_config).
            runner_cfg = SyntheticSAERunnerConfig(
                synthetic_model=self.model.cfg, sae=sae_cfg, training_samples=samples, batch_size=batch, lr=lr,
                device=str(self.device), output_path=None, checkpoint_path=None, eval_samples=0,
                logger=sae_lens.LoggingConfig(log_to_wandb=False))
            self.trainers[kind] = SAETrainer(cfg=runner_cfg.to_sae_trainer_config(), sae=sae, data_provider=iter(()))
        self.batch, self.draw_batch = batch, draw_batch or batch
        with self.rng():
            torch.manual_seed(seed)
            self.stream = self.rng_state()
        return {}

    def eval_set(self, samples: int, seed: int) -> dict:
        start = time.perf_counter()
        with self.rng():
            torch.manual_seed(10_000 + seed)
            self.eval_batches = []
            for _ in range(samples // self.batch):
                hidden, features = self.draw(self.batch)
                self.eval_batches.append((hidden, features))
        true_l0 = sum(f._nnz() for _, f in self.eval_batches) / (len(self.eval_batches) * self.batch)
        return {"seconds": time.perf_counter() - start, "true_l0": true_l0}

    def chunk(self, n: int, path: str | None) -> dict:
        """The next n training samples: written to ``path``, or (None, in-process) answered as "x" on the device."""
        start = time.perf_counter()
        with self.rng():
            self.set_rng_state(self.stream)
            # a draw holds a (draw_batch, num_features) block of correlated noise
            x = torch.cat([self.draw(min(self.draw_batch, n - i))[0] for i in range(0, n, self.draw_batch)])
            self.stream = self.rng_state()
        if path is None:
            return {"seconds": time.perf_counter() - start, "x": x}
        save_file({"x": x.contiguous()}, path)
        return {"seconds": time.perf_counter() - start}

    def stream_state(self) -> dict:
        """The training sample stream's RNG state (bytes as ints), for a run that stops and resumes."""
        return {"state": self.stream.tolist()}

    def set_stream(self, state: list) -> dict:
        self.stream = torch.tensor(state, dtype=torch.uint8)
        return {}

    def train(self, kind: str, path: str | None = None, x: torch.Tensor | None = None) -> dict:
        """SAELens's SAETrainer.fit loop, one batch at a time (its public seams), minus wandb and the progress bar, on
        PATH's samples (or, in-process, on ``x``)."""
        trainer = self.trainers[kind]
        x = load_file(path, device=str(self.device))["x"] if x is None else x
        start = time.perf_counter()
        for batch in x.split(self.batch):
            trainer.maybe_reset_sparsity()
            trainer.step(batch)
            trainer.n_training_steps += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"seconds": time.perf_counter() - start}

    def save(self, folders: dict) -> dict:
        for kind, folder in folders.items():
            self.trainers[kind].set_final_sae_metadata()
            self.trainers[kind].sae.save_inference_model(folder)
        return {}

    def score(self, saes: list) -> dict:
        """Each folder scored by SAELens's evaluation twice: encoding with batch top-k over eval batches (as
        SyntheticSAERunner's final eval encodes with the trained SAE) and with the folder's own JumpReLU threshold."""
        results = []
        for name, folder, k in saes:
            for encode, sae in (("batch top-k", batchtopk_from_folder(folder, k).to(self.device)),
                                ("threshold", sae_lens.SAE.load_from_disk(folder, device=str(self.device)))):
                replay = Replay(self.model, self.eval_batches)
                n = len(self.eval_batches) * self.batch
                with torch.no_grad():
                    result = eval_sae_on_synthetic_data(sae, replay, replay, num_samples=n, batch_size=self.batch)
                results.append({"name": name, "encode": encode, "mcc": result.mcc,
                                "f1": result.classification.f1_score, "uniqueness": result.uniqueness,
                                "explained_variance": result.explained_variance, "l0": result.sae_l0,
                                "dead": result.dead_latents, "true_l0": result.true_l0})
        return {"results": results}


def batchtopk_from_folder(folder: str, k: float) -> sae_lens.BatchTopKTrainingSAE:
    """A saved BatchTopK / Matryoshka folder (a JumpReLU for inference) as SAELens's BatchTopK SAE again: the same
    weights, decoder norms already folded in, latents chosen by batch top-k."""
    cfg = json.loads((Path(folder) / "cfg.json").read_text())
    weights = load_file(str(Path(folder) / "sae_weights.safetensors"))
    sae = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(
        d_in=cfg["d_in"], d_sae=cfg["d_sae"], k=k, rescale_acts_by_decoder_norm=False,
        apply_b_dec_to_input=cfg["apply_b_dec_to_input"]))
    sae.load_state_dict({"W_enc": weights["W_enc"], "b_enc": weights["b_enc"], "W_dec": weights["W_dec"],
                         "b_dec": weights["b_dec"], "topk_threshold": weights["threshold"][0].double()})
    return sae


def main() -> None:
    peer = Peer()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "threads":
            torch.set_num_threads(request["n"])
            answer = {}
        else:
            answer = getattr(peer, op)(**request)
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
