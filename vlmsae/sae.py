"""The sparse autoencoder: one module for the kinds researchers train today.

    x (..., d_in)
      u       = x * act_scale - b_dec                 (b_dec only if apply_b_dec_to_input)
      pre     = u @ W_enc + b_enc                     (..., d_sae)
      latents = activation[kind](pre)                 (..., d_sae), sparse
      recon   = (latents @ W_dec + b_dec) / act_scale (..., d_in), the model's own units

Kinds: `topk` (Gao et al. 2024), `batchtopk` (Bussmann et al. 2024), `relu`
(ReLU + L1, Bricken et al. 2023 with Anthropic's April 2024 update) and
`jumprelu` (Rajamanoharan et al. 2024). This module is the reference math; the
fast training step lives in `vlmsae.trainer` and the file layouts in
`vlmsae.saefile`.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from vlmsae.errors import ConfigError

KINDS = ("topk", "batchtopk", "relu", "jumprelu")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
B_DEC_INITS = ("geometric_median", "mean", "zeros")


@dataclass
class SAEConfig:
    """Shape, kind and loss recipe of one SAE. Checked on construction."""

    d_in: int
    """Width of the activations the SAE reads (the model's d_model)."""
    d_sae: int | None = None
    """Number of latents; None means 32 * d_in, the usual expansion."""
    kind: str = "topk"
    """Activation: topk, batchtopk, relu or jumprelu."""
    k: int = 32
    """topk: latents kept per token; batchtopk: latents kept per token on average over a batch."""
    aux_k: int | None = None
    """topk kinds: dead latents that model the residual in the AuxK loss; None means d_in // 2 (Gao et al. 2024 §A.2)."""
    aux_coefficient: float = 1 / 32
    """topk kinds: weight of the AuxK loss (Gao et al. 2024 §A.2)."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead (Gao et al. 2024)."""
    batchtopk_threshold_lr: float = 0.01
    """batchtopk: rate of the moving average that learns the inference threshold (Bussmann et al. 2024)."""
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
    b_dec_init: str = "geometric_median"
    """How `init_from_batch` sets b_dec: geometric_median (Bricken et al. 2023), mean or zeros."""
    dtype: str = "float32"
    """Parameter dtype: float32, float64, float16 or bfloat16."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Where the SAE belongs: hook_name (e.g. blocks.9.hook_resid_post), model_name, model_class_name, hf_layer_path, token_kinds."""

    def __post_init__(self):
        _check_int("d_in", self.d_in, 1)
        if self.d_sae is None:
            self.d_sae = 32 * self.d_in
        _check_int("d_sae", self.d_sae, 1)
        if self.kind not in KINDS:
            raise ConfigError(f"kind={self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        _check_int("k", self.k, 1)
        if self.kind in ("topk", "batchtopk") and self.k > self.d_sae:
            raise ConfigError(f"k={self.k} must be in 1..d_sae={self.d_sae}; lower k or raise d_sae")
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


class SAEOutput(NamedTuple):
    """What `SAE.forward` returns; every tensor keeps the input's leading shape."""

    recon: Tensor
    """(..., d_in) reconstruction, in the model's units."""
    latents: Tensor
    """(..., d_sae) sparse latent activations."""
    pre_acts: Tensor
    """(..., d_sae) encoder pre-activations (what the AuxK and JumpReLU losses need)."""


class SAE(nn.Module):
    """A sparse autoencoder over `(..., d_in)` activations.

    `SAE(d_in=768, d_sae=24576, k=32)` builds a TopK SAE; pass `kind=` for the
    others, or a ready `SAEConfig`. `SAE.load(folder)` opens SAELens and
    EleutherAI sparsify folders; `sae.save(folder)` writes the SAELens layout.
    """

    def __init__(self, cfg: SAEConfig | None = None, *, device: torch.device | str | None = None, **fields: Any):
        if cfg is None:
            cfg = SAEConfig(**fields)
        elif fields:
            raise ConfigError(f"pass either an SAEConfig or its fields, not both (got cfg and {sorted(fields)})")
        super().__init__()
        self.cfg = cfg
        d_in, d_sae, dtype = cfg.d_in, cfg.d_sae, DTYPES[cfg.dtype]
        # Decoder rows start as random directions and the encoder as their
        # transpose (Gao et al. 2024). ReLU rows start at norm 0.1
        # (Anthropic, April 2024 update); the other kinds keep unit rows.
        W_dec = torch.randn(d_sae, d_in, device=device, dtype=torch.float32)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        if cfg.kind == "relu":
            W_dec *= 0.1
        W_dec = W_dec.to(dtype)
        self.W_dec = nn.Parameter(W_dec)
        # W_enc is [d_in, d_sae] but stored as the transpose of a contiguous
        # [d_sae, d_in] block, so that the sparse training step gathers and
        # scatters whole rows per latent. The file keeps SAELens' layout.
        self.W_enc = nn.Parameter(W_dec.clone().T)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        if cfg.kind == "jumprelu":
            self.threshold = nn.Parameter(torch.full((d_sae,), cfg.jumprelu_init_threshold, device=device, dtype=dtype))
        elif cfg.kind == "batchtopk":
            # Learned from training batches, used at inference (eval mode).
            self.register_buffer("threshold", torch.zeros(d_sae, device=device, dtype=dtype))
        # A power of two, so that folding it into the saved weights is exact.
        self.register_buffer("act_scale", torch.ones((), device=device, dtype=torch.float32))

    @property
    def metadata(self) -> dict[str, Any]:
        """Where this SAE belongs (hook_name, model_name, ...); written to cfg.json."""
        return self.cfg.metadata

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether training keeps decoder rows at unit norm (all kinds but relu, which penalises the norm instead)."""
        return self.cfg.kind != "relu"

    def center(self, x: Tensor) -> Tensor:
        """(..., d_in) model activations -> the encoder's input u = x * act_scale - b_dec."""
        u = x.to(self.W_dec.dtype) * self.act_scale.to(self.W_dec.dtype)
        return u - self.b_dec if self.cfg.apply_b_dec_to_input else u

    def pre_acts(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_sae) encoder pre-activations."""
        return self.center(x) @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """(..., d_sae) pre-activations -> sparse latents, by kind."""
        kind = self.cfg.kind
        if kind == "topk" or (kind == "batchtopk" and self.training):
            keep = self.cfg.k if kind == "topk" else self.cfg.k * pre[..., 0].numel()
            flat = pre if kind == "topk" else pre.reshape(-1)
            values, indices = flat.topk(keep, dim=-1, sorted=False)
            return torch.zeros_like(flat).scatter(-1, indices, values.relu()).reshape(pre.shape)
        if kind == "relu":
            return pre.relu()
        # jumprelu, and batchtopk at inference: a per-latent threshold.
        return pre.relu() * (pre > self.threshold)

    def encode(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_sae) sparse latents."""
        return self.activate(self.pre_acts(x))

    def decode(self, latents: Tensor) -> Tensor:
        """(..., d_sae) -> (..., d_in) reconstruction, in the model's units."""
        latents = latents.to(self.W_dec.dtype)
        return (latents @ self.W_dec + self.b_dec) / self.act_scale.to(self.W_dec.dtype)

    def forward(self, x: Tensor) -> SAEOutput:
        pre = self.pre_acts(x)
        latents = self.activate(pre)
        return SAEOutput(self.decode(latents), latents, pre)

    @torch.no_grad()
    def init_from_batch(self, x: Tensor) -> None:
        """Set the input scale and b_dec from a first batch of activations (..., d_in).

        The scale (if `normalize_activations`) is the power of two closest to
        sqrt(d_in) / mean ||x||; b_dec is `cfg.b_dec_init` of the scaled batch.
        """
        x = x.reshape(-1, self.cfg.d_in).float()
        if self.cfg.normalize_activations:
            mean_norm = x.norm(dim=1).mean().clamp_min(torch.finfo(torch.float32).tiny)
            self.act_scale.copy_(2.0 ** torch.round(torch.log2(math.sqrt(self.cfg.d_in) / mean_norm)))
        x = x * self.act_scale
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(x))
        elif self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(x.mean(0))
        else:
            self.b_dec.zero_()

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Drop the part of W_dec.grad along each decoder row, which unit-norm renormalisation would undo anyway (Bricken et al. 2023)."""
        grad = self.W_dec.grad
        if grad is not None:
            along = torch.bmm(grad.unsqueeze(1), self.W_dec.unsqueeze(2)).squeeze(2)  # (d_sae, 1) row-wise dots
            grad.addcmul_(along, self.W_dec, value=-1)

    def save(self, path: str | Path) -> None:
        """Write `path/cfg.json` + `path/sae_weights.safetensors` in the SAELens layout, replacing the folder
        as a whole (a failed save leaves an existing one as it was).

        Raises SAEFileError if `path` is a file or holds other files, or the metadata cannot be written;
        NonFiniteError on NaN/Inf weights; OSError from the disk.
        """
        from vlmsae.saefile import save_sae  # saefile imports this module

        save_sae(self, path)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> "SAE":
        """Open a vlmsae / SAELens folder or an EleutherAI sparsify folder, in eval mode.

        Raises SAEFileError, naming the file and the fix, if the folder, its cfg.json or its weights
        are missing, malformed or disagree with each other.
        """
        from vlmsae.saefile import load_sae  # saefile imports this module

        return load_sae(path, device=device)


@torch.no_grad()
def geometric_median(points: Tensor, iters: int = 64, eps: float = 1e-8) -> Tensor:
    """(n, d) -> (d,) point minimising the sum of Euclidean distances (Weiszfeld's algorithm).

    Robust to outliers, unlike the mean; Bricken et al. 2023 initialise b_dec with it.
    A fixed number of iterations keeps it free of host synchronisation.
    """
    median = points.mean(0)
    for _ in range(iters):
        weights = 1 / (points - median).norm(dim=1).clamp_min(eps)
        median = (weights[:, None] * points).sum(0) / weights.sum()
    return median

