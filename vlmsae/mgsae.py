"""MGSAE: one TopK dictionary for paired image and text embeddings, trained to share latents across the pair.

Kaushik, Barch and Fanelli 2026 (arXiv 2601.20028, "Decomposing multimodal embedding spaces with group-sparse
autoencoders"): an SAE trained on the embeddings of a dual encoder (CLIP, SigLIP) learns a split dictionary,
most latents firing for one modality only. Training on (image, text) pairs with a group-sparsity penalty and a
random mask shared by the pair makes the latents multimodal:

    x_m (..., d_in), m in (image, text)
      u_m     = x_m * act_scale - b_pre[m]             modality-specific pre-encoder bias
      pre_m   = u_m @ W_enc + b_enc                    shared encoder  (..., d_sae)
      z_m     = TopK(pre_m, excluding masked latents)  the mask: training only, one for both codes of a pair
      recon_m = (z_m @ W_dec + b_dec[m]) / act_scale   shared decoder, modality-specific post-decoder bias

    loss = mean over pairs of ||x_image - recon_image||^2 + ||x_text - recon_text||^2
                              + group_coefficient * sum_j sqrt(z_image_j^2 + z_text_j^2)

in the SAE's units (squared errors summed over d_in, so that the paper's lambda 0.05 applies to unit-norm
embeddings). The penalty is the l2,1 norm of the pair's codes: a latent firing for both modalities costs
sqrt(a^2 + b^2), less than the a + b of two latents firing for one modality each. Its gradient at a latent
where both codes are zero is taken as 0 (:func:`group_sparsity`), not the NaN of autograd's sqrt at 0 nor the
shifted value of sqrt(... + eps): the identities of the penalty hold exactly (disjoint supports: the sum of the
two L1 norms; identical codes: sqrt(2) times the L1 norm), and 0 is in the subdifferential of the norm at 0.

This module is the reference math; the training step lives in :mod:`vlmsae.mgsae_trainer`, the file layout in
:mod:`vlmsae.saefile` (architecture "mgsae").
"""

import torch
from torch import Tensor, nn

from vlmsae.errors import ConfigError
from vlmsae.sae import SAE, SAEOutput, geometric_median
from vlmsae.saeconfig import MGSAEConfig, SAEConfig

MODALITIES = ("image", "text")
"""The two sides of a pair, in the order of the rows of ``b_pre`` and ``b_dec``."""


def modality_index(modality: str) -> int:
    """0 for "image", 1 for "text"; raises ConfigError otherwise."""
    if modality not in MODALITIES:
        raise ConfigError(f"modality={modality!r} must be one of {', '.join(map(repr, MODALITIES))}")
    return MODALITIES.index(modality)


class _Norm(torch.autograd.Function):
    """sqrt(s) of sums of squares s >= 0; gradient 1 / (2 sqrt(s)) where s > 0 and 0 where s = 0."""

    @staticmethod
    def forward(ctx, s: Tensor) -> Tensor:
        root = s.sqrt()
        ctx.save_for_backward(root)
        return root

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (root,) = ctx.saved_tensors
        return torch.where(root > 0, grad / (2 * root).clamp_min(torch.finfo(root.dtype).tiny), 0)


def pair_norm(squares: Tensor) -> Tensor:
    """sqrt of `squares` (any shape, >= 0, each the sum z_image^2 + z_text^2 of one latent of one pair), with a
    gradient of 0 where it is 0 (see the module docstring)."""
    return _Norm.apply(squares)


def group_sparsity(z_image: Tensor, z_text: Tensor) -> Tensor:
    """(..., d_sae) codes of the two sides of pairs -> (...,) sum over latents j of sqrt(z_image_j^2 + z_text_j^2)
    (the l2,1 norm; Kaushik et al. 2026). Finite gradient everywhere: 0 where both codes are 0."""
    return pair_norm(z_image.pow(2) + z_text.pow(2)).sum(-1)


class MGSAE(SAE):
    """A TopK SAE over the pooled embeddings of (image, text) pairs: one shared dictionary (W_enc, b_enc, W_dec),
    a pre-encoder bias ``b_pre`` (2, d_in) and a post-decoder bias ``b_dec`` (2, d_in) per modality (row 0 image,
    row 1 text).

    ``MGSAE(d_in=64, d_sae=512, k=8)`` or ``MGSAE(MGSAEConfig(...))``. ``sae.encode(x, "image")`` and
    ``sae.encode(x, "text")`` give the codes (..., d_sae) of image and text embeddings (..., d_in), in eval mode
    deterministic; ``sae.to_sae("image")`` is a plain :class:`~vlmsae.SAE` for splice / evaluate / steer at that
    modality's site. Trained by :func:`vlmsae.train_mgsae`; ``save`` / ``MGSAE.load`` as every SAE.
    """

    config_class = MGSAEConfig

    def __init__(self, cfg: MGSAEConfig | None = None, *, device: torch.device | str | None = None, **fields):
        super().__init__(cfg, device=device, **fields)
        dtype = self.W_dec.dtype
        self.b_dec = nn.Parameter(torch.zeros(len(MODALITIES), self.cfg.d_in, device=device, dtype=dtype))
        self.b_pre = nn.Parameter(torch.zeros(len(MODALITIES), self.cfg.d_in, device=device, dtype=dtype))

    def center(self, x: Tensor, modality: str) -> Tensor:
        """(..., d_in) embeddings of `modality` -> the encoder's input u = x * act_scale - b_pre[modality]."""
        u = x.to(self.W_dec.dtype) * self.act_scale.to(self.W_dec.dtype)
        return u - self.b_pre[modality_index(modality)]

    def pre_acts(self, x: Tensor, modality: str) -> Tensor:
        """(..., d_in) -> (..., d_sae) encoder pre-activations."""
        return self.center(x, modality) @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor, mask: Tensor | None = None) -> Tensor:
        """(..., d_sae) pre-activations -> the k largest, ReLU'd; `mask` (bool, broadcast to pre): latents left
        out of the TopK (the training mask of :meth:`random_mask`)."""
        if mask is not None:
            pre = pre.masked_fill(mask, -torch.inf)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    def encode(self, x: Tensor, modality: str, mask: Tensor | None = None) -> Tensor:
        """(..., d_in) embeddings of `modality` ("image" or "text") -> (..., d_sae) sparse codes."""
        return self.activate(self.pre_acts(x, modality), mask)

    def decode(self, latents: Tensor, modality: str) -> Tensor:
        """(..., d_sae) -> (..., d_in) reconstruction of a `modality` embedding, in the model's units."""
        latents = latents.to(self.W_dec.dtype)
        bias = self.b_dec[modality_index(modality)]
        return (latents @ self.W_dec + bias) / self.act_scale.to(self.W_dec.dtype)

    def forward(self, x: Tensor, modality: str, mask: Tensor | None = None) -> SAEOutput:
        """(..., d_in) embeddings of `modality` -> reconstruction (..., d_in), codes and pre-activations (..., d_sae)."""
        pre = self.pre_acts(x, modality)
        latents = self.activate(pre, mask)
        return SAEOutput(self.decode(latents, modality), latents, pre)

    def pair_loss(self, x_image: Tensor, x_text: Tensor, mask: Tensor | None = None) -> Tensor:
        """() the MGSAE loss (module docstring, without AuxK) of n pairs, x_image and x_text (n, d_in); `mask`
        (n or 1, d_sae) bool: latents left out of both codes of each pair. The dense reference of the training step."""
        dtype = self.W_dec.dtype
        scale = self.act_scale.to(dtype)
        image, text = self(x_image, "image", mask), self(x_text, "text", mask)
        squared = (((x_image.to(dtype) - image.recon) * scale).pow(2).sum(-1)
                   + ((x_text.to(dtype) - text.recon) * scale).pow(2).sum(-1))
        return (squared + self.cfg.group_coefficient * group_sparsity(image.latents, text.latents)).mean()

    def random_mask(self, n_pairs: int, generator: torch.Generator) -> Tensor | None:
        """(n_pairs, d_sae) bool, or (1, d_sae) with ``mask_mode="batch"``: True for each latent left out of the
        TopK of both codes of a pair, with probability ``mask_probability``; None when that is 0. Drawn from
        `generator` (on the SAE's device), so that a resumed run draws the same masks."""
        p = self.cfg.mask_probability
        if p == 0:
            return None
        rows = n_pairs if self.cfg.mask_mode == "pair" else 1
        return torch.rand(rows, self.cfg.d_sae, generator=generator, device=self.W_dec.device) < p

    @torch.no_grad()
    def init_from_batch(self, x: Tensor, kinds: Tensor | None = None) -> None:
        """Set the input scale (from both modalities) and each modality's b_pre and b_dec (``cfg.b_dec_init`` of its
        scaled rows) from a first batch x (2, n, d_in) or (2n, d_in): image rows, then text rows. ``kinds`` is
        ignored (the modality of a row is its place), accepted as ``SAE.init_from_batch`` takes it."""
        x = x.reshape(len(MODALITIES), -1, self.cfg.d_in).float()
        if self.cfg.normalize_activations:
            mean_norm = x.norm(dim=-1).mean().clamp_min(torch.finfo(torch.float32).tiny)
            self.act_scale.copy_(2.0 ** torch.round(torch.log2(self.cfg.d_in ** 0.5 / mean_norm)))
        x = x * self.act_scale
        for i, rows in enumerate(x):
            if self.cfg.b_dec_init == "geometric_median":
                self.b_dec[i] = geometric_median(rows)
            elif self.cfg.b_dec_init == "mean":
                self.b_dec[i] = rows.mean(0)
            else:
                self.b_dec[i] = 0
        self.b_pre.copy_(self.b_dec)

    @classmethod
    def from_tensors(cls, cfg: MGSAEConfig, tensors) -> "MGSAE":
        """An MGSAE of `cfg` holding `tensors` (named and shaped as in its ``state_dict()``: an SAE's, with b_dec
        and b_pre (2, d_in)). Raises ConfigError if one is missing, unexpected or of the wrong shape."""
        sae = super().from_tensors(cfg, tensors)
        sae.b_pre = nn.Parameter(tensors["b_pre"].contiguous())
        return sae

    @torch.no_grad()
    def to_sae(self, modality: str) -> SAE:
        """A plain TopK :class:`~vlmsae.SAE` that encodes and decodes `modality` as this one does (up to rounding):
        b_pre folded into b_enc (b_enc - b_pre[m] @ W_enc, with ``apply_b_dec_to_input=False``), b_dec[m] its
        b_dec. For splice / ablate / steer / evaluate at that modality's site (``hook_image_embeds``, ...).
        Copies: training one does not move the other."""
        m = modality_index(modality)
        cfg = SAEConfig(d_in=self.cfg.d_in, d_sae=self.cfg.d_sae, k=self.cfg.k, architecture="topk",
                        apply_b_dec_to_input=False, normalize_activations=self.cfg.normalize_activations,
                        dtype=self.cfg.dtype, metadata={**self.metadata, "modality": modality})
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc - self.b_pre[m] @ self.W_enc, "W_dec": self.W_dec,
                   "b_dec": self.b_dec[m], "act_scale": self.act_scale}
        return SAE.from_tensors(cfg, {name: t.detach().clone() for name, t in tensors.items()}).train(self.training)
