"""MGSAE vs TopK on Shapes-CLIP pairs: FVU per modality, the modality census, dead latents, zero-shot from codes.

Issue 15, item 4; the MGSAE paper's comparison (Kaushik et al. 2026, arXiv 2601.20028: on CLIP ViT-B/16 and
CC3M, latents firing on both modalities 4618 -> 6230, dead 441 -> 136, zero-shot CIFAR-10 from sparse codes
0.657 -> 0.842, TopK -> MGSAE) on the shipped Shapes-CLIP (joint space 64).

Method, one run: record (image, caption) pairs of ``--pairs`` Shapes images (one to three objects, full
captions) with ``vlmsae.embedding_pairs`` and scale each embedding to unit norm (CLIP compares them by cosine;
the paper's lambda 0.05 is for unit-norm embeddings). For every ``d_sae:k`` setting and seed, train from the
same initial weights (``torch.manual_seed(seed)``) for the same steps, batch of pairs, learning rate and epoch
order:

- ``topk``: a plain TopK ``vlmsae.SAE`` on the union of the two modalities (each step the 2 x batch rows of
  the batch's pairs, image rows then text rows);
- ``mgsae``: ``vlmsae.MGSAE`` on the pairs (``train_mgsae``), the paper's lambda 0.05 and mask p 0.2;
- ``mgsae-0`` (with ``--ablate``): an MGSAE with lambda 0 and no mask, i.e. only its per-modality biases, to
  tell what the penalty and the mask add.

Then, on held-out pairs (seeds from ``EVAL_SEED``, which neither CLIP nor the SAEs saw): FVU per modality
(``metrics.fvu``), the census of the held-out codes (``vlmsae.modality_census``: a latent fires on a row
when its code is > 0; dead = fires on no held-out row), the mean number of latents the two codes of a pair
share, and the zero-shot colour and shape accuracy on ``--zero-shot`` single-object images from codes alone
(``vlmsae.zero_shot_from_codes``: the image's code against the codes of the 15 prompts ``a {color} {shape}``,
cosine; colour scored by the max over shapes, shape by the max over colours, as
``vlmsae.testbed.clip.zero_shot``), next to the raw embeddings' zero-shot (the ceiling). Prints a markdown
table last. Example (the run in benchmarks/RESULTS.md)::

    python benchmarks/mgsae_vs_topk.py --settings 512:8 256:8 2048:16 --seeds 0 1 --ablate
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import vlmsae
from vlmsae import metrics
from vlmsae.testbed import clip, shapes
from vlmsae.testbed.models import EVAL_SEED, TRAIN_SEED

PAIR_SEED = TRAIN_SEED + 5_000_000  # training images for the SAEs (any seed below EVAL_SEED)
BATCH = 128  # images per CLIP forward
SYNC_EVERY = 50  # readouts: where the trainers refresh the dead latents AuxK trains


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def record_pairs(model, tokenizer, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n (image, caption) pairs of fresh Shapes images, unit-norm embeddings (n, d) each."""
    batches = (clip.clip_inputs(shapes.make_samples(BATCH, seed + i), tokenizer) for i in range(-(-n // BATCH)))
    x_image, x_text = vlmsae.embedding_pairs(model, tqdm(batches, total=-(-n // BATCH), desc=f"pairs {seed}"))
    return unit(x_image[:n]), unit(x_text[:n])


@torch.no_grad()
def zero_shot_set(model, tokenizer, n: int):
    """Unit-norm embeddings of n single-object images (n, d) and of the prompts (colors, shapes, d); labels."""
    samples = clip.single_object_samples(n, EVAL_SEED + 500_000)
    images = torch.cat([clip.image_embeds(model, shapes.pixel_values(samples[i:i + 250]))
                        for i in range(0, n, 250)])
    prompts = [f"a {c} {s}" for c in shapes.COLORS for s in shapes.SHAPES]
    text = clip.text_embeds(model, **clip.text_inputs(prompts, tokenizer))
    labels = {c: torch.tensor([values.index(s.objects[0].value(c)) for s in samples])
              for c, values in (("color", shapes.COLORS), ("shape", shapes.SHAPES))}
    return unit(images), unit(text).reshape(len(shapes.COLORS), len(shapes.SHAPES), -1), labels


def train_topk(x_image, x_text, sae: vlmsae.SAE, steps: int, batch_size: int, seed: int, lr: float):
    """The TopK SAE on the union of the modalities, pair batches in train_mgsae's order (seed + epoch)."""
    trainer = vlmsae.SAETrainer(sae, lr=lr, sync_every=SYNC_EVERY)
    n = len(x_image)
    per_epoch = n // batch_size
    for step in tqdm(range(steps), desc="topk", leave=False):
        epoch, j = divmod(step, per_epoch)
        if j == 0:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        rows = order[j * batch_size:(j + 1) * batch_size]
        trainer.step(torch.cat([x_image[rows], x_text[rows]]))
    return sae.eval()


@torch.no_grad()
def measure(encode, decode, held_image, held_text, zs_images, zs_prompts, labels) -> dict:
    """encode(x, modality) -> codes, decode(z, modality) -> recon: the row of the table."""
    z_image, z_text = encode(held_image, "image"), encode(held_text, "text")
    census = vlmsae.modality_census(z_image, z_text)
    image_codes, prompt_codes = encode(zs_images, "image"), encode(zs_prompts, "text")
    color = vlmsae.zero_shot_from_codes(image_codes, prompt_codes).accuracy(labels["color"])
    shape = vlmsae.zero_shot_from_codes(image_codes, prompt_codes.transpose(0, 1)).accuracy(labels["shape"])
    return {"fvu_image": metrics.fvu(held_image, decode(z_image, "image")).item(),
            "fvu_text": metrics.fvu(held_text, decode(z_text, "text")).item(),
            **census.counts(), "shared": ((z_image > 0) & (z_text > 0)).sum(1).float().mean().item(),
            "color": color, "shape": shape}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["512:8"], help="d_sae:k pairs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--pairs", type=int, default=8192, help="training pairs")
    p.add_argument("--held-out", type=int, default=2048, help="held-out pairs for FVU and the census")
    p.add_argument("--zero-shot", type=int, default=1000, help="single-object images for zero-shot")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256, help="pairs per step (the TopK SAE sees 2x rows)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--group-coefficient", type=float, default=0.05)
    p.add_argument("--mask-probability", type=float, default=0.2)
    p.add_argument("--ablate", action="store_true", help="also an MGSAE with lambda 0 and no mask")
    p.add_argument("--dead-tokens", type=int, default=None,
                   help="rows without firing after which a latent is dead and AuxK trains it (default: SAEConfig's "
                        "10M, never reached here, so AuxK stays off)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = clip.load_clip()
    x_image, x_text = record_pairs(model, tokenizer, args.pairs, PAIR_SEED)
    held_image, held_text = record_pairs(model, tokenizer, args.held_out, EVAL_SEED)
    zs_images, zs_prompts, labels = zero_shot_set(model, tokenizer, args.zero_shot)
    d_in = x_image.shape[1]

    def identity(x, modality):
        return x

    raw = measure(identity, identity, held_image, held_text, zs_images, zs_prompts, labels)
    rows = [("raw embeddings (ceiling)", "-", "-", raw)]
    variants = [("topk", None), ("mgsae", (args.group_coefficient, args.mask_probability))]
    if args.ablate:
        variants.append(("mgsae-0", (0.0, 0.0)))
    dead = {} if args.dead_tokens is None else {"dead_tokens": args.dead_tokens}
    for setting in args.settings:
        d_sae, k = map(int, setting.split(":"))
        for seed in args.seeds:
            for name, mg in variants:
                torch.manual_seed(seed)  # the same initial W_enc / W_dec for every variant
                if mg is None:
                    sae = train_topk(x_image, x_text, vlmsae.SAE(d_in=d_in, d_sae=d_sae, k=k, **dead), args.steps,
                                     args.batch, seed, args.lr)
                    row = measure(lambda x, m: sae.encode(x), lambda z, m: sae.decode(z), held_image, held_text,
                                  zs_images, zs_prompts, labels)
                else:
                    sae = vlmsae.MGSAE(d_in=d_in, d_sae=d_sae, k=k, group_coefficient=mg[0], mask_probability=mg[1],
                                       **dead)
                    vlmsae.train_mgsae(x_image, x_text, sae, steps=args.steps, batch_size=args.batch, seed=seed,
                                       lr=args.lr, sync_every=SYNC_EVERY, progress=False)
                    sae.eval()
                    row = measure(sae.encode, sae.decode, held_image, held_text, zs_images, zs_prompts, labels)
                rows.append((name, f"{d_sae}:{k}", seed, row))
                tqdm.write(f"{name} {d_sae}:{k} seed {seed}: {row}")

    print(f"\n{args.pairs} training pairs, {args.steps} steps of {args.batch} pairs, lr {args.lr}; held out: "
          f"{args.held_out} pairs (census, FVU), {args.zero_shot} single-object images (zero-shot); "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| SAE | d_sae:k | seed | FVU image | FVU text | image only | text only | both | dead | shared / pair "
          "| colour | shape |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, setting, seed, r in rows:
        fvu = ("-", "-") if name.startswith("raw") else (f"{r['fvu_image']:.3f}", f"{r['fvu_text']:.3f}")
        census = ("-",) * 5 if name.startswith("raw") else (
            r["image_only"], r["text_only"], r["both"], r["dead"], f"{r['shared']:.2f}")
        print(f"| {name} | {setting} | {seed} | {' | '.join(fvu)} | {' | '.join(map(str, census))} "
              f"| {r['color']:.3f} | {r['shape']:.3f} |")


if __name__ == "__main__":
    main()
