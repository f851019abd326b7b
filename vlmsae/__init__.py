"""vlmsae: sparse autoencoders on live vision-language models."""

from . import metrics, plots
from .adapters import FAMILIES, Kind, ModelInfo, layers, load_model, special_token_ids
from .analysis import (ImageQuestionGrid, PatchLayout, Scan, TopExamples, concept_aurocs, latent_table,
                       image_question_grid, patch_grid, patch_layout, scan)
from .buffer import RingBuffer
from .deprecation import renamed_attributes
from .dashboard import write_dashboard
from .errors import (ConfigError, LayerIndexError, NonFiniteError, SAEFileError, SiteError, UnsupportedModelError,
                     VlmsaeError)
from .evaluate import evaluate
from .explain import VLMExplainer, explain, score_boxes, score_detection
from .export import neuronpedia_json, write_neuronpedia
from .hooks import SITES, Forward, attach
from .mgsae import MGSAE
from .mgsae_trainer import MGSAETrainer, train_mgsae
from .multimodal import Census, ZeroShot, modality_census, zero_shot_from_codes
from .pairs import embedding_pairs, pooled_pairs
from .interventions import LatentStats, Splice, ablate, latent_stats, place, reconstruct, splice, steer
from .probes import compare_probes, probe_accuracy
from .record import Recording, record
from .sae import SAE, SAEConfig, SAEOutput, Transcoder
from .saeconfig import MGSAEConfig
from .shards import Shards, harvest
from .train import OnlineRunConfig, TrainResult, train
from .trainer import SAETrainer, SAETrainerConfig, TrainMetrics

__all__ = [
    # models and hooks
    "FAMILIES", "Kind", "ModelInfo", "layers", "load_model", "special_token_ids", "SITES", "Forward", "attach", "Recording", "record",
    # SAEs and training
    "SAE", "SAEConfig", "SAEOutput", "Transcoder", "SAETrainer", "SAETrainerConfig", "TrainMetrics", "metrics",
    "RingBuffer", "train", "OnlineRunConfig", "TrainResult", "harvest", "Shards",
    "MGSAE", "MGSAEConfig", "MGSAETrainer", "train_mgsae", "embedding_pairs", "pooled_pairs",
    # interventions and evaluation
    "splice", "ablate", "steer", "place", "reconstruct", "evaluate", "latent_stats", "Splice", "LatentStats",
    # analysis
    "scan", "latent_table", "concept_aurocs", "image_question_grid", "patch_grid", "patch_layout", "Scan",
    "TopExamples", "PatchLayout", "ImageQuestionGrid", "compare_probes", "probe_accuracy", "write_dashboard", "plots",
    "neuronpedia_json", "write_neuronpedia", "explain", "score_detection", "score_boxes", "VLMExplainer",
    "modality_census", "zero_shot_from_codes", "Census", "ZeroShot",
    # errors
    "VlmsaeError", "ConfigError", "LayerIndexError", "NonFiniteError", "SAEFileError", "SiteError",
    "UnsupportedModelError",
]

# Old names that work until 0.3, with a DeprecationWarning (vlmsae/deprecation.py lists every rename).
__getattr__ = renamed_attributes(__name__, {"TrainConfig": "OnlineRunConfig", "TrainerConfig": "SAETrainerConfig",
                                            "feature_table": "latent_table"}, globals())
