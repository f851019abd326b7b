"""vlmsae: sparse autoencoders on live vision-language models."""

import warnings

from . import metrics, plots
from .adapters import FAMILIES, Kind, ModelInfo, layers, load_model
from .analysis import (ImageQuestionGrid, PatchLayout, Scan, TopExamples, concept_aurocs, feature_table,
                       image_question_grid, patch_grid, patch_layout, scan)
from .buffer import RingBuffer
from .dashboard import write_dashboard
from .errors import (ConfigError, LayerIndexError, NonFiniteError, SAEFileError, SiteError, UnsupportedModelError,
                     VlmsaeError)
from .evaluate import evaluate
from .hooks import SITES, Forward, attach
from .interventions import LatentStats, Splice, ablate, latent_stats, reconstruct, splice, steer
from .probes import compare_probes, probe_accuracy
from .record import Recording, record
from .sae import SAE, SAEConfig, SAEOutput
from .shards import Shards, harvest
from .train import OnlineRunConfig, TrainResult, train
from .trainer import SAETrainer, SAETrainerConfig, TrainMetrics

__all__ = [
    # models and hooks
    "FAMILIES", "Kind", "ModelInfo", "layers", "load_model", "SITES", "Forward", "attach", "Recording", "record",
    # SAEs and training
    "SAE", "SAEConfig", "SAEOutput", "SAETrainer", "SAETrainerConfig", "TrainMetrics", "metrics",
    "RingBuffer", "train", "OnlineRunConfig", "TrainResult", "harvest", "Shards",
    # interventions and evaluation
    "splice", "ablate", "steer", "reconstruct", "evaluate", "latent_stats", "Splice", "LatentStats",
    # analysis
    "scan", "feature_table", "concept_aurocs", "image_question_grid", "patch_grid", "patch_layout", "Scan",
    "TopExamples", "PatchLayout", "ImageQuestionGrid", "compare_probes", "probe_accuracy", "write_dashboard", "plots",
    # errors
    "VlmsaeError", "ConfigError", "LayerIndexError", "NonFiniteError", "SAEFileError", "SiteError",
    "UnsupportedModelError",
]

# Renamed in issue 12 (three configs were called Train*Config); the old names work, with a warning, for one release.
RENAMED = {"TrainConfig": OnlineRunConfig, "TrainerConfig": SAETrainerConfig}


def __getattr__(name: str):
    if name in RENAMED:
        new = RENAMED[name]
        warnings.warn(f"vlmsae.{name} is now vlmsae.{new.__name__}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return new
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
