"""vlmsae: sparse autoencoders on live vision-language models."""

from .adapters import FAMILIES, Kind, ModelInfo, layers
from .errors import (ConfigError, LayerIndexError, NonFiniteError, SAEFileError, SiteError, UnsupportedModelError,
                     VlmsaeError)
from .hooks import SITES, Forward, attach
from .record import Recording, record

__all__ = [
    "FAMILIES", "Kind", "ModelInfo", "layers", "SITES", "Forward", "attach", "Recording", "record",
    "VlmsaeError", "ConfigError", "LayerIndexError", "NonFiniteError", "SAEFileError", "SiteError",
    "UnsupportedModelError",
]
