"""Peer side of the interop checks: runs inside the interop venv (sae-lens, eai-sparsify), never imports vlmsae.

    python peers.py JOBS.json   # a list of jobs, run in order in this one process (the imports are slow):
        ["saelens-read", FOLDER, INPUTS, OUT]          open a folder with sae_lens, encode/decode INPUTS
        ["saelens-write", FOLDER, ARCH, INPUTS, OUT]   write an SAE with sae_lens, and its outputs
        ["sparsify-write", FOLDER, INPUTS, OUT]        write an SAE with sparsify, and its outputs
        ["gemma-scope-write", FOLDER, KIND, INPUTS, OUT]  write a Gemma Scope 2 style JumpReLU SAE ("sae") or
                                                       transcoder ("transcoder") at layer 1 of a Gemma 3, and its outputs

INPUTS holds one tensor "x" (n, d_in); OUT gets "latents" (n, d_sae) and "recon" (n, d_in) (d_out: a transcoder's).
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file

D_IN, D_SAE, K = 16, 64, 4


def saelens_read(folder: str, inputs: str, out: str) -> None:
    from sae_lens import SAE

    sae = SAE.load_from_disk(folder)
    x = load_file(inputs)["x"]
    with torch.no_grad():
        latents = sae.encode(x)
        save_file({"latents": latents, "recon": sae.decode(latents), "forward": sae(x)}, out)


def saelens_write(folder: str, architecture: str, inputs: str, out: str) -> None:
    import sae_lens

    torch.manual_seed(0)
    if architecture == "topk-training":
        # Trained with decoder-norm rescaling; save_inference_model folds the norms in.
        sae = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    elif architecture == "topk":
        sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    elif architecture == "standard":
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    elif architecture == "jumprelu":
        sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    else:
        raise SystemExit(f"unknown architecture {architecture!r}")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)  # decoder rows of uneven norm
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        if architecture == "jumprelu":
            sae.threshold.uniform_(0, 0.2)
    sae.cfg.metadata.hook_name = "blocks.3.hook_resid_post"
    if architecture == "topk-training":
        sae.save_inference_model(folder)
    else:
        sae.save_model(folder)
    x = load_file(inputs)["x"]
    with torch.no_grad():
        latents = sae.encode(x)
        save_file({"latents": latents, "recon": sae.decode(latents), "forward": sae(x)}, out)


def gemma_scope_write(folder: str, kind: str, inputs: str, out: str) -> None:
    """What SAELens' Gemma Scope 2 loader builds (loading/pretrained_sae_loaders.py, get_gemma_3_config_from_hf):
    JumpReLU, no b_dec subtracted from the input, hook names and Hugging Face module names in the metadata."""
    import sae_lens

    x = load_file(inputs)["x"]
    d_in, d_sae = x.shape[-1], 4 * x.shape[-1]
    torch.manual_seed(0)
    if kind == "transcoder":
        sae = sae_lens.JumpReLUTranscoder(sae_lens.JumpReLUTranscoderConfig(
            d_in=d_in, d_sae=d_sae, d_out=d_in, apply_b_dec_to_input=False))
        names = {"hook_name": "blocks.1.hook_mlp_in", "hook_name_out": "blocks.1.hook_mlp_out",
                 "hf_hook_name": "model.layers.1.pre_feedforward_layernorm.output",
                 "hf_hook_name_out": "model.layers.1.post_feedforward_layernorm.output"}
    else:
        sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False))
        names = {"hook_name": "blocks.1.hook_resid_post", "hf_hook_name": "model.layers.1.output"}
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(d_sae, 1) + 0.5)
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.threshold.uniform_(0, 0.3)
    for key, value in {"model_name": "google/gemma-3-tiny", "hook_head_index": None, "prepend_bos": True,
                       "context_size": 1024, "dataset_path": "monology/pile-uncopyrighted", **names}.items():
        sae.cfg.metadata[key] = value
    sae.save_model(folder)
    with torch.no_grad():
        latents = sae.encode(x)
        save_file({"latents": latents, "recon": sae.decode(latents), "forward": sae(x)}, out)


def sparsify_write(folder: str, inputs: str, out: str) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K))
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    sae.save_to_disk(folder)
    x = load_file(inputs)["x"]
    with torch.no_grad():
        top_acts, top_indices, _ = sae.encode(x)
        latents = torch.zeros(x.shape[0], D_SAE).scatter(1, top_indices, top_acts)
        save_file({"latents": latents, "recon": sae.decode(top_acts, top_indices), "forward": sae(x).sae_out}, out)


if __name__ == "__main__":
    commands = {"saelens-read": saelens_read, "saelens-write": saelens_write, "sparsify-write": sparsify_write,
                "gemma-scope-write": gemma_scope_write}
    with open(sys.argv[1]) as handle:
        for command, *args in json.load(handle):
            commands[command](*args)
