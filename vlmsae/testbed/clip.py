"""Shapes-CLIP: a small dual encoder (``CLIPModel``) trained contrastively on Shapes images and descriptions.

Shipped in ``vlmsae/testbed/checkpoints/clip/`` (1.7 MB: safetensors, config, tokenizer), trained by this
module on CPU, deterministically from a seed and the thread count, by the commands below (the defaults of
:class:`ShapesClipConfig`: width 96, 3 vision and 2 text layers, joint space 64, batch 128)::

    python -m vlmsae.testbed train clip --out /tmp/clip                       # 1500 steps
    python -m vlmsae.testbed train clip --init /tmp/clip --seed 100000 \
        --steps 300 --warmup 20 --lr 5e-4 --out /tmp/clip2                   # continue, fresh samples
    python -m vlmsae.testbed train clip --init /tmp/clip2 --seed 200000 \
        --steps 300 --warmup 20 --lr 5e-4                                     # continue, fresh samples

and measured with ``python -m vlmsae.testbed eval clip --n 2000``: zero-shot colour accuracy 1.0 and shape
0.965 on 2000 fresh single-object images (``reduce="mean"``: 1.0 and 0.965); on 2000 images of one to
three objects, every object's value right in reading order, 0.62 and 0.61.

Training time, 1 thread (``--threads 2`` ran 6-10x slower per step on the 2 shared cores, which other
jobs kept busy): 578 + 86 + 98 s = 12.7 minutes for the 2100 steps, at load averages of 10 falling to 3;
a step (forward, backward, AdamW) takes 0.21-0.26 s at load 4, plus 0.075 s to draw and describe the
batch. It misses the 5 minutes asked (issue 14): at 1000 steps shape accuracy was 0.90, and a smaller
model (width 64, 2 + 1 layers, 1800 steps) reached 0.79; colour is 1.0 after 200-300 steps.

The model: a CLIP vision tower on the ``IMAGE_SIZE`` = 48 pixel Shapes image with 8-pixel patches, a
**6 x 6 patch grid** (row-major after the CLS token, as :meth:`shapes.Sample.patch_labels` orders it; a
small object touches 2 x 2 patches, a fifth of them 2 x 3 or 3 x 3, a large one 3 x 3), a causal text tower
on the Shapes words, and linear projections of both to a joint space. The text is ``<bos> description <eot>``; the text
tower pools at ``<eot>``, a token the Shapes tokenizer gets here (CLIP pools at the first
``eos_token_id``, except that an ``eos_token_id`` of 2, the Shapes ``<eos>``, selects transformers' legacy
"highest token id" pooling).

Training texts (:func:`describe`) are the Shapes captions with attributes left out at random, one choice of
kept attributes for all objects of an image: ``a small red circle at the top left``, ``a red circle``,
``a circle and a square``, ``a shape``. A text describes an image when it names as many objects as the
image has and every attribute it names is the object's, in reading order; the contrastive targets are
spread evenly over every text of the batch that describes the image (and every image the text
describes), not only the image's own text (:func:`match_matrix`). Samples come from seeds ``seed + step``;
evaluation uses :data:`~vlmsae.testbed.models.EVAL_SEED` and up, which training never reaches.
Training adds a throw-away linear head that makes every patch token of the vision tower's last layer
predict the shape of the object it shows (as the captioner's does; ``patch_aux``); it is not part of the
saved model. Shape is what is slow to learn: without the head, shape accuracy was at chance (0.37) after
600 steps and with it 0.60. (An 8 x 8 grid, patch 6, with a 3x head weight and twice the learning rate, learnt
faster per step, 0.72 after 420 steps, but a step cost 1.7x; not pursued.)

The vision residual stream localises (for the next item of issue 14, scan heatmaps on vision sites): on
300 fresh images, the best single coordinate of the output of vision layer 1 (``hidden_states[1]``) ranks
the patches of each colour's objects above all other patches with AUROC 0.94-0.97; layers 2-3 do the same
for shape (0.96-0.99).

Zero-shot (:func:`zero_shot`): an image with ``k`` objects is compared with every prompt
``a {color} {shape} and a {color} {shape} ...`` of ``k`` objects (``k`` is given, as the QA model's answer
lists one value per object); the predicted colours are those of the best prompt, i.e. each colour tuple is
scored by the max over shape tuples (``reduce="mean"`` averages instead), and shapes alike. The label is
the tuple of values in reading order, as :meth:`shapes.Sample.answer` gives it; the accuracy of record is
on single-object images (drawn from the ordinary sampler, the others skipped).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    PreTrainedTokenizerFast,
)

from ..errors import ConfigError
from ..files import write_folder_atomic
from . import shapes
from .models import EVAL_SEED, MODELS_DIR, TRAIN_SEED

CLIP_DIR = MODELS_DIR / "clip"
EOT_TOKEN = "<eot>"
"""The end of a CLIP text, where the text tower pools; appended to the Shapes vocabulary (the last id)."""
ATTRIBUTES = ("size", "color", "shape", "position")
"""What a description may name about each object."""
MAX_TEXT = 32  # tokens: three full object phrases joined by "and" (26 words), <bos> and <eot>


@dataclass
class ShapesClipConfig:
    """How Shapes-CLIP is built (widths, depths) and trained (steps, batch, schedule, seed)."""

    steps: int = 1500
    """Optimizer steps; each sees a fresh batch."""
    batch: int = 128
    """Image-text pairs per step (the contrastive batch)."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 5% of it)."""
    warmup: int = 40
    """Warmup steps."""
    weight_decay: float = 0.01
    """AdamW weight decay (matrices only)."""
    d_model: int = 96
    """Width of both towers."""
    vision_layers: int = 3
    """Vision tower layers."""
    text_layers: int = 2
    """Text tower layers."""
    projection_dim: int = 64
    """Width of the joint embedding space."""
    patch: int = shapes.PATCH
    """Vision patch, pixels: the grid is ``IMAGE_SIZE / patch`` square (8: 6 x 6, 6: 8 x 8)."""
    p_full: float = 0.25
    """Probability that a training text is the full caption; otherwise each attribute is kept with p=1/2."""
    patch_aux: float = 1.0
    """Weight of a training-only loss that makes every patch token of the vision tower's last layer predict
    the shape of the object it shows (0: off); the head is not part of the saved model."""
    seed: int = TRAIN_SEED
    """Seeds the weights, the training images and the choice of descriptions."""
    threads: int = 1
    """``torch.set_num_threads`` while training (1: on a shared 2-core machine 2 threads ran 6-10x slower)."""
    init: str = ""
    """A checkpoint folder to continue training from; empty: fresh weights."""

    def __post_init__(self):
        if self.d_model % 32:
            raise ConfigError(f"d_model={self.d_model} must be a multiple of 32 (4 heads, head_dim divisible by 8)")
        if self.steps < 1 or self.batch < 2:
            raise ConfigError(f"steps={self.steps} must be >= 1 and batch={self.batch} >= 2 (a contrastive batch)")
        if not 0 <= self.warmup < self.steps:
            raise ConfigError(f"warmup={self.warmup} must be in 0..steps-1={self.steps - 1}")
        if shapes.IMAGE_SIZE % self.patch:
            raise ConfigError(f"patch={self.patch} must divide IMAGE_SIZE={shapes.IMAGE_SIZE}")
        if not 0.0 <= self.p_full <= 1.0:
            raise ConfigError(f"p_full={self.p_full} must be in [0, 1]")


def build_clip_tokenizer() -> PreTrainedTokenizerFast:
    """The Shapes tokenizer (:func:`shapes.build_tokenizer`) with :data:`EOT_TOKEN` added as its ``eos_token``."""
    tokenizer = shapes.build_tokenizer()
    tokenizer.add_special_tokens({"eos_token": EOT_TOKEN})
    return tokenizer


def clip_config(cfg: ShapesClipConfig, tokenizer: PreTrainedTokenizerFast) -> CLIPConfig:
    """Vision tower (6 x 6 patches) + causal text tower + projections; no dropout."""
    heads = 4
    vision = CLIPVisionConfig(
        hidden_size=cfg.d_model, intermediate_size=2 * cfg.d_model, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=heads, image_size=shapes.IMAGE_SIZE, patch_size=cfg.patch,
        projection_dim=cfg.projection_dim,
    )
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=2 * cfg.d_model,
        num_hidden_layers=cfg.text_layers, num_attention_heads=heads, max_position_embeddings=MAX_TEXT,
        projection_dim=cfg.projection_dim, pad_token_id=shapes.PAD, bos_token_id=shapes.BOS,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=cfg.projection_dim)


# ---------------------------------------------------------------------------------------- texts


class Description(NamedTuple):
    """A text about an image: per object (reading order), the attributes it names and their values."""

    objects: tuple[tuple[tuple[str, str], ...], ...]

    @property
    def text(self) -> str:
        return " and ".join(_phrase(dict(o)) for o in self.objects)

    def describes(self, sample: shapes.Sample) -> bool:
        """Names as many objects as ``sample`` has, and every attribute it names is that object's."""
        return len(self.objects) == len(sample.objects) and all(
            _value(obj, a) == v for named, obj in zip(self.objects, sample.objects) for a, v in named)


def _value(obj: shapes.ShapeObject, attribute: str) -> str:
    return obj.position if attribute == "position" else obj.value(attribute)


def _phrase(named: dict[str, str]) -> str:
    words = ["a", named.get("size"), named.get("color"), named.get("shape", "shape")]
    if "position" in named:
        words.append(f"at the {named['position']}")
    return " ".join(w for w in words if w)


def describe(sample: shapes.Sample, keep: tuple[str, ...] = ATTRIBUTES) -> Description:
    """The description of ``sample`` naming the attributes ``keep`` of every object (all: the caption)."""
    return Description(tuple(tuple((a, _value(o, a)) for a in ATTRIBUTES if a in keep) for o in sample.objects))


def _training_descriptions(samples: list[shapes.Sample], rng: np.random.Generator, p_full: float
                           ) -> list[Description]:
    full = rng.random(len(samples)) < p_full
    kept = rng.random((len(samples), len(ATTRIBUTES))) < 0.5
    return [describe(s, ATTRIBUTES if f else tuple(a for a, k in zip(ATTRIBUTES, row) if k))
            for s, f, row in zip(samples, full, kept)]


def match_matrix(samples: list[shapes.Sample], descriptions: list[Description]) -> torch.Tensor:
    """``(n_images, n_texts)`` bool: does text ``j`` describe image ``i``."""
    return torch.tensor([[d.describes(s) for d in descriptions] for s in samples])


# ---------------------------------------------------------------------------------------- inputs


def text_inputs(texts: list[str], tokenizer) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``<bos> text <eot>``, right-padded with ``<pad>``."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for text, row in zip(texts, ids):
        if tokenizer.unk_token_id in row:
            raise ConfigError(f"text {text!r} has words outside the Shapes vocabulary")
    rows = [[shapes.BOS, *row, tokenizer.eos_token_id] for row in ids]
    if max(len(r) for r in rows) > MAX_TEXT:
        raise ConfigError(f"a text is longer than MAX_TEXT={MAX_TEXT} tokens: {max(texts, key=len)!r}")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), shapes.PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def clip_inputs(samples: list[shapes.Sample], tokenizer, texts: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Inputs for ``model(**inputs)``: the samples' ``pixel_values`` and ``texts`` (default: their captions)."""
    texts = [s.caption for s in samples] if texts is None else texts
    return {"pixel_values": shapes.pixel_values(samples), **text_inputs(texts, tokenizer)}


# ---------------------------------------------------------------------------------------- training


def _patch_targets(samples: list[shapes.Sample], patch: int) -> torch.Tensor:
    """``(batch * patches,)``: 0 for a background patch, else 1 + the shape of the object it shows."""
    rows = []
    for s in samples:
        kinds = [1 + shapes.SHAPES.index(o.shape) for o in s.objects]
        rows.append([0 if k < 0 else kinds[k] for k in s.patch_labels(patch).reshape(-1)])  # row-major, as CLIP's
    return torch.tensor(rows, dtype=torch.long).reshape(-1)


def _loss(model: CLIPModel, inputs: dict[str, torch.Tensor], match: torch.Tensor,
          patch_head: torch.nn.Linear | None = None, patch_targets: torch.Tensor | None = None,
          patch_aux: float = 0.0) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with the target of each row spread over all its true matches; plus
    ``patch_aux`` times the patch head's cross-entropy."""
    out = model(**inputs)
    logits = out.logits_per_image  # (images, texts), scaled by the learnt temperature
    target = match.float()
    image_to_text = F.cross_entropy(logits, target / target.sum(1, keepdim=True))
    text_to_image = F.cross_entropy(logits.T, (target / target.sum(0, keepdim=True)).T)
    loss = (image_to_text + text_to_image) / 2
    if patch_head is None:
        return loss
    patches = out.vision_model_output.last_hidden_state[:, 1:]  # (batch, patches, d_model), CLS dropped
    return loss + patch_aux * F.cross_entropy(patch_head(patches.reshape(-1, patches.shape[-1])), patch_targets)


def train_clip(out: str | Path | None = CLIP_DIR, cfg: ShapesClipConfig | None = None
               ) -> tuple[CLIPModel, PreTrainedTokenizerFast]:
    """Train Shapes-CLIP; save it (and its tokenizer) to ``out`` atomically unless ``None``."""
    cfg = cfg or ShapesClipConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = build_clip_tokenizer()
    if cfg.init:
        model = CLIPModel.from_pretrained(cfg.init, local_files_only=True)
    else:
        model = CLIPModel(clip_config(cfg, tokenizer))
    patch_head = torch.nn.Linear(cfg.d_model, 1 + len(shapes.SHAPES)) if cfg.patch_aux else None
    params = list(model.parameters()) + (list(patch_head.parameters()) if patch_head else [])
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    bar = tqdm(range(cfg.steps), desc="train clip", mininterval=2.0)
    ema = None
    for step in bar:
        samples = shapes.make_samples(cfg.batch, cfg.seed + step)
        descriptions = _training_descriptions(samples, np.random.default_rng([cfg.seed + step, 0xC11]), cfg.p_full)
        inputs = clip_inputs(samples, tokenizer, [d.text for d in descriptions])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        patch_targets = _patch_targets(samples, cfg.patch) if patch_head else None
        loss = _loss(model, inputs, match_matrix(samples, descriptions), patch_head, patch_targets,
                     cfg.patch_aux)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100 (Radford et al. 2021, §2.5)
            model.logit_scale.clamp_(0, math.log(100))
        value = loss.item()  # CPU training: a host sync per step costs nothing here
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        bar.set_postfix(loss=f"{ema:.4f}", refresh=False)
    model.eval()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_folder_atomic(out, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return model, tokenizer


def load_clip(path: str | Path = CLIP_DIR) -> tuple[CLIPModel, PreTrainedTokenizerFast]:
    """The shipped (or a retrained) Shapes-CLIP and its tokenizer, in eval mode; :func:`clip_inputs` makes
    its inputs."""
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------------------------- zero-shot


def image_embeds(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(batch, projection_dim)``: ``model.get_image_features``, which returns the tensor itself up to
    transformers 5.x and an output whose ``pooler_output`` it is after."""
    out = model.get_image_features(pixel_values=pixel_values)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def text_embeds(model: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(batch, projection_dim)``: ``model.get_text_features``, as :func:`image_embeds`."""
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def single_object_samples(n: int, seed: int) -> list[shapes.Sample]:
    """The first ``n`` single-object images of ``make_samples(256, seed)``, ``make_samples(256, seed + 1)``, ..."""
    out, i = [], 0
    while len(out) < n:
        out += [s for s in shapes.make_samples(256, seed + i) if len(s.objects) == 1]
        i += 1
    return out[:n]


@torch.no_grad()
def zero_shot(model: CLIPModel, tokenizer, samples: list[shapes.Sample], reduce: str = "max",
              ) -> list[dict[str, tuple[str, ...]]]:
    """Per sample, the predicted ``color`` and ``shape`` tuples (one value per object, reading order).

    Each image is scored against every prompt ``a {color} {shape} [and a {color} {shape} ...]`` with as
    many objects as it has (cosine similarity of the projected embeddings); a colour tuple scores the max
    (or the mean) over shape tuples of its prompts, and a shape tuple the max (mean) over colour tuples.
    """
    if reduce not in ("max", "mean"):
        raise ConfigError(f"reduce={reduce!r} must be 'max' or 'mean'")
    image = F.normalize(image_embeds(model, shapes.pixel_values(samples)), dim=-1)
    preds: list[dict[str, tuple[str, ...]] | None] = [None] * len(samples)
    for k in sorted({len(s.objects) for s in samples}):
        colors = list(itertools.product(shapes.COLORS, repeat=k))
        kinds = list(itertools.product(shapes.SHAPES, repeat=k))
        prompts = [" and ".join(f"a {c} {s}" for c, s in zip(cs, ss)) for cs in colors for ss in kinds]
        text = F.normalize(text_embeds(model, **text_inputs(prompts, tokenizer)), dim=-1)
        rows = [i for i, s in enumerate(samples) if len(s.objects) == k]
        sim = (image[rows] @ text.T).reshape(len(rows), len(colors), len(kinds))
        pool = (lambda x, dim: x.amax(dim)) if reduce == "max" else (lambda x, dim: x.mean(dim))
        best_color, best_shape = pool(sim, 2).argmax(1), pool(sim, 1).argmax(1)
        for r, i in enumerate(rows):
            preds[i] = {"color": colors[best_color[r]], "shape": kinds[best_shape[r]]}
    return preds


def _accuracy(model, tokenizer, samples: list[shapes.Sample], reduce: str, batch: int) -> dict[str, float]:
    hits = {"color": [], "shape": []}
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        for s, p in zip(chunk, zero_shot(model, tokenizer, chunk, reduce)):
            for concept, found in hits.items():
                found.append(p[concept] == tuple(o.value(concept) for o in s.objects))
    return {c: sum(v) / len(v) for c, v in hits.items()}


def evaluate_clip(model, tokenizer, n: int = 500, seed: int = EVAL_SEED, batch: int = 250) -> dict[str, float]:
    """Zero-shot colour and shape accuracy on ``n`` fresh single-object images (``color``, ``shape``; the
    figures of record), with ``reduce="mean"`` (``*_mean``), and on ``n`` fresh images of one to three
    objects (``*_all``: every object's value right, in reading order)."""
    one = single_object_samples(n, seed)
    result = _accuracy(model, tokenizer, one, "max", batch)
    result.update({f"{k}_mean": v for k, v in _accuracy(model, tokenizer, one, "mean", batch).items()})
    mixed = [s for start in range(0, n, batch) for s in shapes.make_samples(min(batch, n - start), seed + start)]
    result.update({f"{k}_all": v for k, v in _accuracy(model, tokenizer, mixed, "max", batch).items()})
    return result
