"""The sparse autoencoder: one module for the architectures researchers train today.

    x (..., d_in)
      u       = x * act_scale - b_dec                 (b_dec only if apply_b_dec_to_input)
      pre     = u @ W_enc + b_enc                     (..., d_sae)
      latents = activation[arch](pre)                 (..., d_sae), sparse
      recon   = (latents @ W_dec + b_dec) / act_scale (..., d_in), the model's own units

A transcoder (`Transcoder`, Dunefsky et al. 2024) is the same module with a decoder of another width, `d_out`,
that writes where the model's MLP writes rather than where the encoder reads:

    x (..., d_in)   at metadata["hook_name"]      the MLP's input, after its pre-norm (``blocks.L.hook_mlp_in``)
      latents = activation[arch](x @ W_enc + b_enc)      (..., d_sae)
      out     = latents @ W_dec + b_dec                  (..., d_out)
    predicts        metadata["hook_name_out"]     what the MLP adds to the residual (``blocks.L.hook_mlp_out``)

with no decoder bias subtracted from the input and no input scale, as SAELens' ``Transcoder`` (ReLU) and
``JumpReLUTranscoder`` (Gemma Scope 2's transcoders) compute it; its folder is theirs. vlmsae does not train them.

Kinds: `topk` (Gao et al. 2024), `batchtopk` (Bussmann et al. 2024), `relu`
(ReLU + L1, Bricken et al. 2023 with Anthropic's April 2024 update) and
`jumprelu` (Rajamanoharan et al. 2024). This module is the reference math; the
fast training step lives in `vlmsae.trainer` and the file layouts in
`vlmsae.saefile`.
"""

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from vlmsae import saefile
from vlmsae.errors import ConfigError, SAEFileError
from vlmsae.deprecation import renamed_attributes, warn_renamed
from vlmsae.saeconfig import ARCHITECTURES, DTYPES, SAEConfig  # noqa: F401  (ARCHITECTURES: callers find them here)


class SAEOutput(NamedTuple):
    """What `SAE.forward` returns; every tensor keeps the input's leading shape."""

    recon: Tensor
    """(..., d_in) reconstruction, in the model's units ((..., d_out) for a transcoder: its prediction)."""
    latents: Tensor
    """(..., d_sae) sparse latent activations."""
    pre_acts: Tensor
    """(..., d_sae) encoder pre-activations (what the AuxK and JumpReLU losses need)."""


class SAE(nn.Module):
    """A sparse autoencoder over `(..., d_in)` activations.

    `SAE(d_in=768, d_sae=24576, k=32)` builds a TopK SAE; pass `architecture=` for the
    others, or a ready `SAEConfig`. `SAE.load(folder)` opens SAELens and
    EleutherAI sparsify folders (and returns a `Transcoder` for a transcoder's folder); `sae.save(folder)` writes the
    SAELens layout.
    """

    config_class = SAEConfig
    """The config class this SAE class is built from (a subclass's own, e.g. MGSAEConfig)."""
    is_transcoder = False
    """Whether the decoder writes another site than the encoder reads (`cfg.d_out` set): `Transcoder` sets it."""

    def __init__(self, cfg: SAEConfig | None = None, *, device: torch.device | str | None = None, **fields: Any):
        if cfg is None:
            if "kind" in fields and "architecture" not in fields:
                warn_renamed("SAE(kind=...)", "architecture=")
                fields["architecture"] = fields.pop("kind")
            cfg = self.config_class(**fields)
        elif fields:
            raise ConfigError(f"pass either an SAEConfig or its fields, not both (got cfg and {sorted(fields)})")
        if type(cfg) is not self.config_class:
            raise ConfigError(f"{type(self).__name__} is built from a {self.config_class.__name__}, not a "
                              f"{type(cfg).__name__}; pass it to {_opener(cfg)}")
        if (cfg.d_out is not None) != self.is_transcoder:
            raise ConfigError(f"d_out={cfg.d_out} makes a transcoder; build it with vlmsae.Transcoder" if cfg.d_out
                              else "a Transcoder needs d_out, the width it writes (the MLP's output: d_model)")
        super().__init__()
        self.cfg = cfg
        d_in, d_sae, dtype = cfg.d_in, cfg.d_sae, DTYPES[cfg.dtype]
        d_out = cfg.d_out or d_in
        # Decoder rows start as random directions and the encoder as their
        # transpose (Gao et al. 2024). ReLU rows start at norm 0.1
        # (Anthropic, April 2024 update); the other architectures keep unit rows.
        W_dec = torch.randn(d_sae, d_out, device=device, dtype=torch.float32)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        if cfg.architecture == "relu":
            W_dec *= 0.1
        W_dec = W_dec.to(dtype)
        self.W_dec = nn.Parameter(W_dec)
        # W_enc is [d_in, d_sae] but stored as the transpose of a contiguous
        # [d_sae, d_in] block, so that the sparse training step gathers and
        # scatters whole rows per latent. The file keeps SAELens' layout.
        # A transcoder's encoder cannot be its decoder's transpose: random unit rows.
        W_enc = W_dec.clone() if cfg.d_out is None else nn.functional.normalize(
            torch.randn(d_sae, d_in, device=device, dtype=torch.float32), dim=1).to(dtype)
        self.W_enc = nn.Parameter(W_enc.T)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, device=device, dtype=dtype))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((d_sae,), cfg.jumprelu_init_threshold, device=device, dtype=dtype))
        elif cfg.architecture == "batchtopk":
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
        """Whether training keeps decoder rows at unit norm (all architectures but relu, which penalises the norm instead)."""
        return self.cfg.architecture != "relu"

    def center(self, x: Tensor) -> Tensor:
        """(..., d_in) model activations -> the encoder's input u = x * act_scale - b_dec."""
        u = x.to(self.W_dec.dtype) * self.act_scale.to(self.W_dec.dtype)
        return u - self.b_dec if self.cfg.apply_b_dec_to_input else u

    def pre_acts(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_sae) encoder pre-activations."""
        return self.center(x) @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """(..., d_sae) pre-activations -> sparse latents, by architecture.

        topk: the k largest per token, ReLU'd (Gao et al. 2024); batchtopk: the k * n_tokens largest over
        the batch in training, a learned per-latent threshold at inference (Bussmann et al. 2024); relu
        (Bricken et al. 2023); jumprelu: ReLU above a learned per-latent threshold (Rajamanoharan et al. 2024).
        """
        arch = self.cfg.architecture
        if arch == "topk" or (arch == "batchtopk" and self.training):
            keep = self.cfg.k if arch == "topk" else self.cfg.k * pre[..., 0].numel()
            flat = pre if arch == "topk" else pre.reshape(-1)
            values, indices = flat.topk(keep, dim=-1, sorted=False)
            return torch.zeros_like(flat).scatter(-1, indices, values.relu()).reshape(pre.shape)
        if arch == "relu":
            return pre.relu()
        # jumprelu, and batchtopk at inference: a per-latent threshold.
        return pre.relu() * (pre > self.threshold)

    def encode(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_sae) sparse latents."""
        return self.activate(self.pre_acts(x))

    def decode(self, latents: Tensor) -> Tensor:
        """(..., d_sae) -> (..., d_in) reconstruction, in the model's units ((..., d_out) for a transcoder)."""
        latents = latents.to(self.W_dec.dtype)
        return (latents @ self.W_dec + self.b_dec) / self.act_scale.to(self.W_dec.dtype)

    def forward(self, x: Tensor) -> SAEOutput:
        """(..., d_in) -> reconstruction (..., d_in), latents and pre-activations (..., d_sae)."""
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

    @classmethod
    def from_tensors(cls, cfg: SAEConfig, tensors: Mapping[str, Tensor]) -> "SAE":
        """An SAE of `cfg` that holds `tensors` (not copies), named and shaped as in its `state_dict()`:
        W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,) (d_out for a transcoder), threshold (d_sae,) for
        jumprelu and batchtopk, act_scale () a power of two. Built without a random init.

        Raises ConfigError if a tensor is missing, unexpected or of the wrong shape.
        """
        with torch.device("meta"):
            sae = cls(cfg)
        shapes = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
        if set(tensors) != set(shapes):
            raise ConfigError(f"a {cfg.architecture} SAE holds tensors {sorted(shapes)}, not {sorted(tensors)}")
        for name, shape in shapes.items():
            if tuple(tensors[name].shape) != shape:
                raise ConfigError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}; an SAE with "
                                  f"d_in={cfg.d_in}, d_sae={cfg.d_sae} needs {shape}")
        # W_enc keeps its [d_sae, d_in] storage (see __init__).
        sae.W_enc = nn.Parameter(tensors["W_enc"].T.contiguous().T)
        sae.b_enc = nn.Parameter(tensors["b_enc"].contiguous())
        sae.W_dec = nn.Parameter(tensors["W_dec"].contiguous())
        sae.b_dec = nn.Parameter(tensors["b_dec"].contiguous())
        if cfg.architecture == "jumprelu":
            sae.threshold = nn.Parameter(tensors["threshold"].contiguous())
        elif cfg.architecture == "batchtopk":
            sae.threshold = tensors["threshold"].contiguous()
        sae.act_scale = tensors["act_scale"]
        return sae

    def save(self, path: str | Path) -> None:
        """Write `path/cfg.json` + `path/sae_weights.safetensors` in the SAELens layout, replacing the folder
        as a whole (a failed save leaves an existing one as it was).

        Raises SAEFileError if `path` is a file or holds other files, or the metadata cannot be written;
        NonFiniteError on NaN/Inf weights; OSError from the disk.
        """
        saefile.write_sae(path, self.cfg, self.state_dict())

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> "SAE":
        """Open a vlmsae / SAELens folder or an EleutherAI sparsify folder, in eval mode; a transcoder's folder (SAELens'
        ``transcoder`` / ``jumprelu_transcoder``) gives a `Transcoder`.

        Raises SAEFileError, naming the file and the fix, if the folder, its cfg.json or its weights
        are missing, malformed or disagree with each other, or if `Transcoder.load` is given an SAE's folder.
        """
        cfg, tensors = saefile.read_sae(path, device=device)
        if type(cfg) is not cls.config_class:
            raise SAEFileError(f"{path}: holds an SAE of architecture {cfg.architecture!r}; open it with "
                               f"{_opener(cfg)}.load")
        if cfg.d_out is not None and not cls.is_transcoder:
            cls = Transcoder
        elif cfg.d_out is None and cls.is_transcoder:
            raise SAEFileError(f"{path}: holds an SAE (its cfg.json has no d_out), not a transcoder; "
                               "open it with vlmsae.SAE.load")
        return cls.from_tensors(cfg, tensors).eval()


def _opener(cfg: SAEConfig) -> str:
    """The class that builds SAEs of ``cfg``'s architecture, by its public name."""
    return "vlmsae.MGSAE" if cfg.architecture == "mgsae" else "vlmsae.SAE"


class Transcoder(SAE):
    """A transcoder over ``(..., d_in)`` inputs predicting ``(..., d_out)`` outputs (see the module's docstring).

    ``Transcoder(d_in=64, d_sae=512, d_out=64, metadata={"hook_name": "blocks.1.hook_mlp_in", "hook_name_out":
    "blocks.1.hook_mlp_out"})`` builds a JumpReLU transcoder (pass ``architecture="relu"`` for the other);
    ``Transcoder.load(folder)`` opens a SAELens transcoder folder (``vlmsae.SAE.load`` does too).
    ``forward(x).recon`` is the prediction ``(..., d_out)``.

    Raises ``ConfigError`` for a config that is not a transcoder's (no ``d_out``, ``apply_b_dec_to_input=True``,
    another architecture).
    """

    is_transcoder = True

    def __init__(self, cfg: SAEConfig | None = None, *, device: torch.device | str | None = None, **fields: Any):
        if cfg is None:
            fields.setdefault("architecture", "jumprelu")
            fields.setdefault("apply_b_dec_to_input", False)
        super().__init__(cfg, device=device, **fields)


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


__getattr__ = renamed_attributes(__name__, {"KINDS": "ARCHITECTURES"}, globals())
