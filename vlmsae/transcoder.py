"""The transcoder: a sparse dictionary that reads one site and writes another (Dunefsky et al. 2024).

    x (..., d_in)   at metadata["hook_name"]      the MLP's input, after its pre-norm (``blocks.L.hook_mlp_in``)
      latents = activation[arch](x @ W_enc + b_enc)      (..., d_sae)
      out     = latents @ W_dec + b_dec                  (..., d_out)
    predicts        metadata["hook_name_out"]     what the MLP adds to the residual (``blocks.L.hook_mlp_out``)

The math is the SAE's (`vlmsae.sae`) with a decoder of width ``d_out``, no decoder bias subtracted from the input
and no input scale, as SAELens' ``Transcoder`` (ReLU) and ``JumpReLUTranscoder`` (Gemma Scope 2's transcoders)
compute it; its folder is theirs (``d_out`` and ``architecture`` ``"transcoder"`` / ``"jumprelu_transcoder"`` in
cfg.json, W_dec ``[d_sae, d_out]``). A splice replaces the MLP's output by the transcoder's prediction from the
MLP's input (:func:`vlmsae.splice`); vlmsae does not train transcoders.
"""

from typing import Any

import torch

from vlmsae.sae import SAE
from vlmsae.saeconfig import SAEConfig


class Transcoder(SAE):
    """A transcoder over ``(..., d_in)`` inputs predicting ``(..., d_out)`` outputs.

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
