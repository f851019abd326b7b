"""vlmsae: sparse autoencoders on live vision-language models."""

from .adapters import FAMILIES, Kind, ModelInfo, layers
from .errors import (ConfigError, LayerIndexError, NonFiniteError, SAEFileError, SiteError, UnsupportedModelError,
                     VlmsaeError)
from .hooks import SITES, Forward, attach
from .evaluate import evaluate
from .interventions import LatentStats, Splice, ablate, latent_stats, reconstruct, splice, steer
from .record import Recording, record
from .sae import SAE, SAEConfig, SAEOutput

__all__ = [
    "FAMILIES", "Kind", "ModelInfo", "layers", "SITES", "Forward", "attach", "Recording", "record",
    "SAE", "SAEConfig", "SAEOutput", "splice", "ablate", "steer", "evaluate", "reconstruct", "latent_stats",
    "Splice", "LatentStats",
    "VlmsaeError", "ConfigError", "LayerIndexError", "NonFiniteError", "SAEFileError", "SiteError",
    "UnsupportedModelError",
]
