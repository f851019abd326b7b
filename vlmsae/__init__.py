"""vlmsae: sparse autoencoders on live vision-language models."""

from .adapters import FAMILIES, Kind, ModelInfo, layers
from .errors import (ConfigError, LayerIndexError, NonFiniteError, SAEFileError, SiteError, UnsupportedModelError,
                     VlmsaeError)
from .hooks import SITES, Forward, attach
from .buffer import RingBuffer
from .evaluate import evaluate
from .interventions import LatentStats, Splice, ablate, latent_stats, reconstruct, splice, steer
from .record import Recording, record
from .sae import SAE, SAEConfig, SAEOutput
from .shards import Shards, harvest
from .train import TrainConfig, train
from .trainer import SAETrainer, TrainerConfig, TrainMetrics
from . import metrics

__all__ = [
    "FAMILIES", "Kind", "ModelInfo", "layers", "SITES", "Forward", "attach", "Recording", "record",
    "SAE", "SAEConfig", "SAEOutput", "splice", "ablate", "steer", "evaluate", "reconstruct", "latent_stats",
    "Splice", "LatentStats", "RingBuffer", "train", "TrainConfig", "harvest", "Shards", "SAETrainer", "TrainerConfig", "TrainMetrics", "metrics",
    "VlmsaeError", "ConfigError", "LayerIndexError", "NonFiniteError", "SAEFileError", "SiteError",
    "UnsupportedModelError",
]
