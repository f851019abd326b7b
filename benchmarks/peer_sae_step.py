"""A peer's TopK training step, timed on request: run by bench_sae_step.py inside the interop venv.

    python peer_sae_step.py {saelens,sparsify} ACTIVATIONS D_SAE K DEVICE

Reads "x" (batch, d_in) from ACTIVATIONS, and "dead" (d_sae,) bool if there (a fixed
dead-latent mask that turns the peer's AuxK loss on), builds the peer's TopK SAE, then for
each line "N" on stdin runs N full training steps (forward, loss, backward,
Adam, the peer's decoder upkeep) and prints one JSON list of seconds per step.
Each step is the one the peer's own trainer runs, minus data loading and logging.
"""

import json
import sys
import time

import torch
from safetensors.torch import load_file


def saelens_step(x: torch.Tensor, d_sae: int, k: int, dead: torch.Tensor | None = None, bookkeeping: bool = False):
    """sae-lens's TopK step. ``dead``: a fixed dead-latent mask handed to every step (sae-lens runs its AuxK
    loss, coefficient 1.0 by default, whenever a latent is dead); ``bookkeeping``: also its trainer's
    per-step firing counters. The step returns (loss, aux loss), detached."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k, device=str(x.device)))
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4)
    if dead is None:
        dead = torch.zeros(d_sae, dtype=torch.bool, device=x.device)
    since_fired = torch.zeros(d_sae, device=x.device)
    act_freq = torch.zeros(d_sae, device=x.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda")

    # As sae_lens.training.sae_trainer.SAETrainer._train_step.
    def step():
        sae.train()
        with autocast:
            out = sae.training_forward_pass(TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False))
            if bookkeeping:
                with torch.no_grad():
                    firing = out.feature_acts.bool().float()
                    since_fired.add_(1).masked_fill_(firing.sum(-2).bool(), 0)
                    act_freq.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        aux = out.losses.get("auxiliary_reconstruction_loss", out.loss.new_zeros(()))
        return out.loss.detach(), torch.as_tensor(aux).detach()

    return step


def sparsify_step(x: torch.Tensor, d_sae: int, k: int, dead: torch.Tensor | None = None, bookkeeping: bool = False,
                  auxk_alpha: float = 1 / 32):
    """sparsify's TopK step with Adam. ``dead``: a fixed dead-latent mask handed to every step, which turns on
    its AuxK loss as its trainer does with ``auxk_alpha > 0`` (its default is 0: no AuxK); ``bookkeeping``:
    also its trainer's per-step firing counters. The step returns (loss, aux loss), detached."""
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=d_sae, k=k), device=x.device, dtype=torch.float32)
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / (d_sae / 2**14) ** 0.5)
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=x.device)
    did_fire = torch.zeros(d_sae, dtype=torch.bool, device=x.device)

    # As sparsify.trainer.Trainer.fit with loss_fn="fvu" (its default), minus the metrics it logs.
    def step():
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=dead)
        if bookkeeping:
            did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + auxk_alpha * out.auxk_loss if dead is not None else out.fvu
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        if bookkeeping:
            with torch.no_grad():
                since_fired.add_(x.shape[0]).masked_fill_(did_fire, 0)
                did_fire.zero_()
        return loss.detach(), out.auxk_loss.detach()

    return step


def main() -> None:
    peer, activations, d_sae, k, device = sys.argv[1:]
    tensors = load_file(activations)
    x, dead = tensors["x"].to(device), tensors.get("dead")
    step = {"saelens": saelens_step, "sparsify": sparsify_step}[peer](
        x, int(d_sae), int(k), dead=None if dead is None else dead.to(device))
    step()  # warm-up
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        print(json.dumps(times), flush=True)


if __name__ == "__main__":
    main()
