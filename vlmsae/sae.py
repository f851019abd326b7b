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

With ``normalize_per_kind`` (issue 15) the input scale is one per token kind instead, and a mean too:

      u       = (x - kind_mean[g]) * kind_scale[g] - b_dec       g = 1 for an image token, 0 for any other kind
      recon   = (latents @ W_dec + b_dec) / kind_scale[g] + kind_mean[g]

so that image and text rows, whose means and norms differ widely in a VLM's residual, each reach the encoder
centred and at mean norm sqrt(d_in); every call then takes ``kinds`` (a tensor of `vlmsae.Kind`, ``x.shape[:-1]``).

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
from vlmsae.adapters import Kind
from vlmsae.errors import ConfigError, SAEFileError
from vlmsae.deprecation import renamed_attributes, warn_renamed
from vlmsae.saeconfig import ARCHITECTURES, DTYPES, SAEConfig  # noqa: F401  (ARCHITECTURES: callers find them here)


KIND_ROWS = ("text", "image")
"""The rows of `kind_mean` / `kind_scale` (``normalize_per_kind``): image tokens take row 1, every other kind row 0
(text, generated: the same token stream; special and pad tokens, which training leaves out, are read as text)."""


def _power_of_two_scale(x: Tensor, d_in: int) -> Tensor:
    """() the power of two closest to sqrt(d_in) / mean ||x|| over the rows of `x` (n, d_in) (Anthropic, April 2024
    update: a fixed scale; a power of two, so that scaling and unscaling are exact)."""
    mean_norm = x.norm(dim=1).mean().clamp_min(torch.finfo(torch.float32).tiny)
    return 2.0 ** torch.round(torch.log2(math.sqrt(d_in) / mean_norm))


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
        if cfg.normalize_per_kind:  # rows KIND_ROWS: text (every kind but image), image; set by init_from_batch
            self.register_buffer("kind_mean", torch.zeros(len(KIND_ROWS), d_in, device=device, dtype=dtype))
            self.register_buffer("kind_scale", torch.ones(len(KIND_ROWS), device=device, dtype=dtype))

    @property
    def metadata(self) -> dict[str, Any]:
        """Where this SAE belongs (hook_name, model_name, ...); written to cfg.json."""
        return self.cfg.metadata

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether training keeps decoder rows at unit norm (all architectures but relu, which penalises the norm instead)."""
        return self.cfg.architecture != "relu"

    def kind_rows(self, kinds: Tensor | None, shape: torch.Size) -> Tensor:
        """(...) long: the row of `kind_mean` / `kind_scale` / `kind_k` of each position (1 image, 0 any other kind), for inputs
        of leading shape `shape`. Raises ConfigError when `kinds` is missing or of another shape."""
        if kinds is None:
            why = "normalises per token kind (normalize_per_kind=True)" if self.cfg.normalize_per_kind else \
                f"keeps a k per token kind (k_per_kind={self.cfg.k_per_kind})"
            raise ConfigError(f"this SAE {why}: pass kinds=, the "
                              f"vlmsae.Kind of each position, shape {tuple(shape)} (vlmsae.layers(model).kinds(ids, "
                              "attention_mask), rec.kinds(layer), or a buffer's Rows.kind); splice / ablate / steer / "
                              "evaluate and vlmsae.train pass them themselves")
        if tuple(kinds.shape) != tuple(shape):
            raise ConfigError(f"kinds has shape {tuple(kinds.shape)}; it must be the inputs' leading shape {tuple(shape)}")
        return (kinds.to(self.W_dec.device) == Kind.IMAGE).long()

    def normalize(self, x: Tensor, kinds: Tensor | None = None) -> Tensor:
        """(..., d_in) model activations -> the SAE's normalised units: x * act_scale, or with
        ``normalize_per_kind`` (x - kind_mean[g]) * kind_scale[g] (``kinds``: (...) Kind, ignored without it)."""
        dtype = self.W_dec.dtype
        if not self.cfg.normalize_per_kind:
            return x.to(dtype) * self.act_scale.to(dtype)
        g = self.kind_rows(kinds, x.shape[:-1])
        return (x.to(dtype) - self.kind_mean[g]) * self.kind_scale[g].unsqueeze(-1)

    def denormalize(self, y: Tensor, kinds: Tensor | None = None) -> Tensor:
        """(..., d_in) in the SAE's normalised units -> the model's units: the inverse of `normalize`."""
        dtype = self.W_dec.dtype
        if not self.cfg.normalize_per_kind:
            return y / self.act_scale.to(dtype)
        g = self.kind_rows(kinds, y.shape[:-1])
        return y / self.kind_scale[g].unsqueeze(-1) + self.kind_mean[g]

    def unit_scale(self, kinds: Tensor | None = None) -> Tensor:
        """() act_scale, or with ``normalize_per_kind`` (...) the scale of each position's kind: model units times
        this are normalised units (a decoder row divided by it is the row's direction in the model's units)."""
        if not self.cfg.normalize_per_kind:
            return self.act_scale
        return self.kind_scale[self.kind_rows(kinds, kinds.shape if kinds is not None else ())]

    def center(self, x: Tensor, kinds: Tensor | None = None) -> Tensor:
        """(..., d_in) model activations -> the encoder's input u = normalize(x, kinds) - b_dec."""
        u = self.normalize(x, kinds)
        return u - self.b_dec if self.cfg.apply_b_dec_to_input else u

    def pre_acts(self, x: Tensor, kinds: Tensor | None = None) -> Tensor:
        """(..., d_in) -> (..., d_sae) encoder pre-activations; ``kinds`` (...) with ``normalize_per_kind``."""
        return self.center(x, kinds) @ self.W_enc + self.b_enc

    def token_k(self, kinds: Tensor | None, shape: torch.Size, k: int | None = None) -> Tensor:
        """(...) long: the k of each position with ``k_per_kind`` (its kind's, `cfg.kind_k`; ``k``: this step's
        annealed k). Raises ConfigError when `kinds` is missing or of another shape."""
        text_k, image_k = self.cfg.kind_k(k)
        return torch.where(self.kind_rows(kinds, shape) == 1, image_k, text_k)

    def activate(self, pre: Tensor, kinds: Tensor | None = None) -> Tensor:
        """(..., d_sae) pre-activations -> sparse latents, by architecture.

        topk: the k largest per token, ReLU'd (Gao et al. 2024), with ``k_per_kind`` the k of each position's
        kind (``kinds`` (...) Kind needed, ConfigError without); batchtopk: the k * n_tokens largest over
        the batch in training, a learned per-latent threshold at inference (Bussmann et al. 2024); relu
        (Bricken et al. 2023); jumprelu: ReLU above a learned per-latent threshold (Rajamanoharan et al. 2024).
        """
        arch = self.cfg.architecture
        if self.cfg.k_per_kind is not None:  # topk, with each position's kind's k (``kinds`` (...) needed)
            token_k = self.token_k(kinds, pre.shape[:-1]).to(pre.device)
            values, indices = pre.topk(max(self.cfg.kind_k()), dim=-1)  # sorted: a position keeps its first token_k
            values = values.relu() * (torch.arange(values.shape[-1], device=pre.device) < token_k.unsqueeze(-1))
            return torch.zeros_like(pre).scatter(-1, indices, values)
        if arch == "topk" or (arch == "batchtopk" and self.training):
            keep = self.cfg.k if arch == "topk" else self.cfg.k * pre[..., 0].numel()
            flat = pre if arch == "topk" else pre.reshape(-1)
            values, indices = flat.topk(keep, dim=-1, sorted=False)
            return torch.zeros_like(flat).scatter(-1, indices, values.relu()).reshape(pre.shape)
        if arch == "relu":
            return pre.relu()
        # jumprelu, and batchtopk at inference: a per-latent threshold.
        return pre.relu() * (pre > self.threshold)

    def encode(self, x: Tensor, kinds: Tensor | None = None) -> Tensor:
        """(..., d_in) -> (..., d_sae) sparse latents; ``kinds`` (...) Kind of each position, needed with
        ``normalize_per_kind`` or ``k_per_kind`` (ConfigError without), ignored otherwise."""
        return self.activate(self.pre_acts(x, kinds), kinds)

    def decode(self, latents: Tensor, kinds: Tensor | None = None) -> Tensor:
        """(..., d_sae) -> (..., d_in) reconstruction, in the model's units ((..., d_out) for a transcoder);
        ``kinds`` as in `encode`."""
        latents = latents.to(self.W_dec.dtype)
        return self.denormalize(latents @ self.W_dec + self.b_dec, kinds)

    def forward(self, x: Tensor, kinds: Tensor | None = None) -> SAEOutput:
        """(..., d_in) -> reconstruction (..., d_in), latents and pre-activations (..., d_sae); ``kinds`` as in `encode`."""
        pre = self.pre_acts(x, kinds)
        latents = self.activate(pre, kinds)
        return SAEOutput(self.decode(latents, kinds), latents, pre)

    @torch.no_grad()
    def init_from_batch(self, x: Tensor, kinds: Tensor | None = None) -> None:
        """Set the input normalisation and b_dec from a first batch of activations (..., d_in).

        The scale (if `normalize_activations`) is the power of two closest to
        sqrt(d_in) / mean ||x||; b_dec is `cfg.b_dec_init` of the normalised batch. With `normalize_per_kind`
        (``kinds`` (...) Kind needed), each kind row's mean is the mean of its rows and its scale the power of
        two closest to sqrt(d_in) / mean ||x - mean||; a row without rows in the batch takes the whole batch's.
        """
        x = x.reshape(-1, self.cfg.d_in).float()
        if self.cfg.normalize_per_kind:
            g = self.kind_rows(kinds.reshape(-1) if kinds is not None else None, x.shape[:-1]).to(x.device)
            for row in range(len(KIND_ROWS)):
                mine = x[g == row] if bool((g == row).any()) else x  # one host sync per row, once per run
                mean = mine.mean(0)
                self.kind_mean[row] = mean
                self.kind_scale[row] = _power_of_two_scale(mine - mean, self.cfg.d_in)
            x = (x - self.kind_mean.float()[g]) * self.kind_scale.float()[g].unsqueeze(-1)
        else:
            if self.cfg.normalize_activations:
                self.act_scale.copy_(_power_of_two_scale(x, self.cfg.d_in))
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
        jumprelu and batchtopk, act_scale () a power of two; with normalize_per_kind kind_mean (2, d_in) and
        kind_scale (2,) (rows: `KIND_ROWS`). Built without a random init.

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
        if cfg.normalize_per_kind:
            sae.kind_mean, sae.kind_scale = tensors["kind_mean"], tensors["kind_scale"]
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
