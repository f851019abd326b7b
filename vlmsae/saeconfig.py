"""`SAEConfig`: the shape, architecture and loss recipe of one SAE, and the checks a config and its metadata pass.

Its own module so that the file code (`vlmsae.saefile`) reads and writes configs without the SAE
class, and `vlmsae.sae` builds SAEs from them.
"""

import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vlmsae.deprecation import renamed_attributes, renamed_kwargs, warn_renamed
from vlmsae.errors import ConfigError

ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu")
"""TopK (Gao et al. 2024), BatchTopK (Bussmann et al. 2024), ReLU with an L1 penalty (Bricken et al. 2023;
SAELens' "standard") and JumpReLU (Rajamanoharan et al. 2024)."""
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
B_DEC_INITS = ("geometric_median", "mean", "zeros")
TOPK_ARCHITECTURES = ("topk", "batchtopk", "mgsae")
"""The architectures whose latents are the k largest pre-activations (per token, or per batch)."""
MASK_MODES = ("pair", "batch")
"""MGSAE: how the training mask over latents is drawn: one per (image, text) pair, or one per batch."""
TRANSCODER_ARCHITECTURES = ("relu", "jumprelu")
"""What a transcoder can be: SAELens' ``Transcoder`` (ReLU) and ``JumpReLUTranscoder`` (Gemma Scope 2's)."""


@dataclass
class SAEConfig:
    """Shape, architecture and loss recipe of one SAE. Checked on construction (``ConfigError`` names the bad field)."""

    d_in: int
    """Width of the activations the SAE reads (the model's d_model)."""
    d_sae: int | None = None
    """Number of latents; None means 32 * d_in, the usual expansion."""
    architecture: str = "topk"
    """How latents activate: topk, batchtopk, relu or jumprelu (see ``ARCHITECTURES``)."""
    k: int = 32
    """topk: latents kept per token; batchtopk: latents kept per token on average over a batch."""
    aux_k: int | None = None
    """topk architectures: dead latents that model the residual in the AuxK loss; None means d_in // 2 (Gao et al. 2024 §A.2)."""
    aux_coefficient: float = 1 / 32
    """topk architectures: weight of the AuxK loss (Gao et al. 2024 §A.2)."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead (Gao et al. 2024)."""
    batchtopk_threshold_lr: float = 0.01
    """batchtopk: rate of the moving average that learns the inference threshold (Bussmann et al. 2024)."""
    matryoshka_widths: tuple[int, ...] | None = None
    """topk architectures: nested prefixes of the latents, each trained to reconstruct the input on its own
    (Matryoshka SAEs: Bussmann et al. 2025, Nabeshima 2024; SAELens ``matryoshka_widths``), strictly increasing,
    the last d_sae (added when left out); the losses of the prefixes are summed. None: one level, plain
    TopK / BatchTopK. Changes training only: the SAE encodes and decodes as its architecture does."""
    l1_coefficient: float = 1e-3
    """relu: weight of the L1 penalty on latents times decoder row norms."""
    l0_coefficient: float = 1e-3
    """jumprelu: weight of the L0 penalty."""
    jumprelu_init_threshold: float = 0.001
    """jumprelu: initial threshold of every latent (Rajamanoharan et al. 2024)."""
    jumprelu_bandwidth: float = 0.001
    """jumprelu: width of the rectangle kernel of the straight-through estimator (Rajamanoharan et al. 2024)."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (SAELens' key of the same name)."""
    normalize_activations: bool = False
    """Scale inputs by a fixed power of two that brings their mean norm near sqrt(d_in) (Anthropic, April 2024 update)."""
    normalize_per_kind: bool = False
    """Normalise inputs per token kind: image rows and text rows (every other kind: generated, special, pad) each get
    a mean (d_in,) and a scale () from the first training batch, the scale a power of two bringing the kind's
    centred rows to mean norm sqrt(d_in); the encoder reads (x - mean[kind]) * scale[kind] and ``decode`` returns
    recon / scale[kind] + mean[kind], the model's units. encode / decode / forward then need ``kinds=``. Replaces
    ``normalize_activations``; vlmsae-only (SAELens has no per-token-kind normalisation: such a file is marked so
    that SAELens refuses it). Issue 15."""
    k_per_kind: dict[str, int] | None = None
    """topk: latents kept per token of each kind, e.g. ``{"image": 16, "text": 48}``; keys ``image`` and ``text``
    (text: every kind but image, as ``normalize_per_kind`` reads them), a kind left out keeps ``k``. encode / forward
    then need ``kinds=``; an annealed k (``OnlineRunConfig.k_start``) scales each kind's k alike. vlmsae-only
    (such a file is marked so that SAELens refuses it). None: ``k`` for every token. Issue 15."""
    b_dec_init: str = "geometric_median"
    """How `init_from_batch` sets b_dec: geometric_median (Bricken et al. 2023), mean or zeros."""
    dtype: str = "float32"
    """Parameter dtype: float32, float64, float16 or bfloat16."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Where the SAE belongs: hook_name (e.g. blocks.9.hook_resid_post), model_name, model_class_name, hf_layer_path, token_kinds;
    a transcoder's also hook_name_out (e.g. blocks.9.hook_mlp_out)."""
    d_out: int | None = None
    """A transcoder's output width: it reads (..., d_in) at ``hook_name`` and writes (..., d_out) at ``hook_name_out``
    (SAELens' ``d_out``); None: an SAE, whose decoder writes d_in where it reads."""

    architectures: ClassVar[tuple[str, ...]] = ARCHITECTURES
    """The values ``architecture`` may take in this config class."""

    def __post_init__(self):
        _check_int("d_in", self.d_in, 1)
        if self.d_sae is None:
            self.d_sae = 32 * self.d_in
        _check_int("d_sae", self.d_sae, 1)
        if self.architecture not in self.architectures:
            hint = "; an MGSAE takes an MGSAEConfig" if self.architecture == "mgsae" else ""
            raise ConfigError(f"architecture={self.architecture!r} is unknown; use one of "
                              f"{', '.join(self.architectures)}{hint}")
        _check_int("k", self.k, 1)
        if self.architecture in TOPK_ARCHITECTURES and self.k > self.d_sae:
            raise ConfigError(f"k={self.k} must be in 1..d_sae={self.d_sae}; lower k or raise d_sae")
        if self.matryoshka_widths is not None:
            self.matryoshka_widths = _matryoshka_widths(self.matryoshka_widths, self.d_sae, self.architecture)
        if self.aux_k is None:
            self.aux_k = min(self.d_in // 2, self.d_sae)
        _check_int("aux_k", self.aux_k, 0)
        if self.aux_k > self.d_sae:
            raise ConfigError(f"aux_k={self.aux_k} must be in 0..d_sae={self.d_sae}")
        _check_int("dead_tokens", self.dead_tokens, 1)
        for name in ("aux_coefficient", "l1_coefficient", "l0_coefficient", "jumprelu_init_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a finite number >= 0")
        for name in ("jumprelu_bandwidth", "batchtopk_threshold_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ConfigError(f"{name}={value!r} must be in (0, 1]")
        if self.b_dec_init not in B_DEC_INITS:
            raise ConfigError(f"b_dec_init={self.b_dec_init!r} is unknown; use one of {', '.join(B_DEC_INITS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not a dtype name; use one of {', '.join(DTYPES)}")
        check_metadata(self.metadata)
        if self.d_out is not None:
            self._check_transcoder()
        if not isinstance(self.normalize_per_kind, bool):
            raise ConfigError(f"normalize_per_kind={self.normalize_per_kind!r} must be true or false")
        if self.normalize_per_kind and self.normalize_activations:
            raise ConfigError("normalize_per_kind=True replaces normalize_activations (a scale per token kind instead "
                              "of one); pass normalize_activations=False")
        if self.k_per_kind is not None:
            self._check_k_per_kind()
        if self.normalize_per_kind and self.architecture == "mgsae":
            raise ConfigError("normalize_per_kind=True is for SAEs; an MGSAE has its own image and text biases: "
                              "pass normalize_per_kind=False")

    def _check_k_per_kind(self) -> None:
        if self.architecture != "topk":
            raise ConfigError(f"k_per_kind={self.k_per_kind!r} with architecture={self.architecture!r}: a k per token kind "
                              "is for topk (batchtopk keeps k * n_tokens over the whole batch); use architecture='topk'")
        if not isinstance(self.k_per_kind, dict) or not self.k_per_kind or not set(self.k_per_kind) <= {"image", "text"}:
            raise ConfigError(f"k_per_kind={self.k_per_kind!r} must be a dict with keys 'image' and/or 'text', "
                              "e.g. {'image': 16, 'text': 48}")
        for kind, k in self.k_per_kind.items():
            _check_int(f"k_per_kind[{kind!r}]", k, 1)
            if k > self.d_sae:
                raise ConfigError(f"k_per_kind[{kind!r}]={k} must be in 1..d_sae={self.d_sae}")
        self.k_per_kind = {kind: self.k_per_kind[kind] for kind in ("image", "text") if kind in self.k_per_kind}

    @property
    def reads_kinds(self) -> bool:
        """Whether encode / forward need ``kinds=`` (``normalize_per_kind`` or ``k_per_kind``)."""
        return self.normalize_per_kind or self.k_per_kind is not None

    def kind_k(self, k: int | None = None) -> tuple[int, int]:
        """(k of text tokens, k of image tokens), the rows of ``KIND_ROWS``: ``k_per_kind``'s, else ``k``. With
        this step's `k` (an annealed k) each is scaled by k / self.k (at least 1)."""
        per_kind = self.k_per_kind or {}
        own = [per_kind.get(kind, self.k) for kind in ("text", "image")]
        if k is None or k == self.k:
            return own[0], own[1]
        return tuple(max(1, min(self.d_sae, round(value * k / self.k))) for value in own)

    def _check_transcoder(self) -> None:
        """A transcoder's fields: its decoder bias is of its output's width, and its input is read unscaled."""
        _check_int("d_out", self.d_out, 1)
        if self.architecture not in TRANSCODER_ARCHITECTURES:
            raise ConfigError(f"architecture={self.architecture!r} with d_out={self.d_out}: a transcoder is one of "
                              f"{', '.join(TRANSCODER_ARCHITECTURES)} (SAELens' Transcoder, JumpReLUTranscoder)")
        if self.apply_b_dec_to_input:
            raise ConfigError(f"apply_b_dec_to_input=True with d_out={self.d_out}: a transcoder's b_dec is of its output's "
                              "width and cannot be subtracted from its input; pass apply_b_dec_to_input=False")
        if self.normalize_per_kind:
            raise ConfigError("normalize_per_kind=True with d_out set: a transcoder reads its input unscaled; "
                              "pass normalize_per_kind=False")
        if self.normalize_activations:
            raise ConfigError("normalize_activations=True with d_out set: a transcoder reads its input unscaled; "
                              "pass normalize_activations=False")

    @property
    def kind(self) -> str:
        """Deprecated name of :attr:`architecture`."""
        warn_renamed("SAEConfig.kind", "SAEConfig.architecture")
        return self.architecture


SAEConfig.__init__ = renamed_kwargs(kind="architecture")(SAEConfig.__init__)


@dataclass
class MGSAEConfig(SAEConfig):
    """An MGSAE: a TopK SAE trained on (image, text) pairs with a group-sparsity penalty and a shared random mask
    (Kaushik et al. 2026, arXiv 2601.20028; :mod:`vlmsae.mgsae`). The paper's recipe on CLIP ViT-B/16:
    d_sae 8192, k 32, ``group_coefficient`` 0.05, ``mask_probability`` 0.2. ``aux_k`` and the other TopK fields
    mean what they mean in SAEConfig; ``matryoshka_widths`` is not supported."""

    architecture: str = "mgsae"
    """Always mgsae."""
    group_coefficient: float = 0.05
    """lambda: weight of the group-sparsity penalty sum_j sqrt(z_image_j^2 + z_text_j^2), per pair."""
    mask_probability: float = 0.2
    """Probability that a latent is masked out of TopK (for both codes of a pair) in a training step; 0: no mask."""
    mask_mode: str = "pair"
    """pair: a mask drawn for every (image, text) pair; batch: one mask for every pair of a training batch."""

    architectures: ClassVar[tuple[str, ...]] = ("mgsae",)

    def __post_init__(self):
        super().__post_init__()
        value = self.group_coefficient
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"group_coefficient={value!r} must be a finite number >= 0 (the paper's lambda: 0.05)")
        value = self.mask_probability
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"mask_probability={value!r} must be in [0, 1) (the paper's: 0.2; 0 turns the mask off)")
        if self.mask_mode not in MASK_MODES:
            raise ConfigError(f"mask_mode={self.mask_mode!r} is unknown; use one of {', '.join(MASK_MODES)}")


def _matryoshka_widths(widths, d_sae: int, architecture: str) -> tuple[int, ...]:
    """The checked widths as a tuple ending at ``d_sae``; raises ``ConfigError`` naming the bad value."""
    if architecture not in ("topk", "batchtopk"):
        raise ConfigError(f"matryoshka_widths is for the topk architectures, not architecture={architecture!r}; "
                          "use architecture='batchtopk' (Matryoshka BatchTopK) or 'topk'")
    widths = list(widths) if isinstance(widths, (list, tuple)) else widths
    if not isinstance(widths, list) or not widths or any(isinstance(w, bool) or not isinstance(w, int) for w in widths):
        raise ConfigError(f"matryoshka_widths={widths!r} must be a non-empty list of integers, e.g. "
                          f"[{d_sae // 16}, {d_sae // 4}, {d_sae}]")
    if widths[-1] != d_sae:
        widths.append(d_sae)
    if widths[0] < 1 or any(a >= b for a, b in zip(widths, widths[1:])) or widths[-1] != d_sae:
        raise ConfigError(f"matryoshka_widths={widths!r} must increase strictly from >= 1 to d_sae={d_sae}")
    return tuple(widths)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} must be an integer >= {low}")


def check_metadata(metadata: Any) -> None:
    """Raise ConfigError unless `metadata` is a dict that JSON can write (it goes into cfg.json)."""
    if not isinstance(metadata, dict) or not all(isinstance(key, str) for key in metadata):
        raise ConfigError(f"metadata={metadata!r} must be a dict with string keys")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"metadata must be JSON-serialisable ({err}); store plain strings, numbers and lists") from err


__getattr__ = renamed_attributes(__name__, {"KINDS": "ARCHITECTURES"}, globals())
