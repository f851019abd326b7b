"""Shapes-CLIP: a small dual encoder (``CLIPModel``) trained contrastively on Shapes images and descriptions.

Shipped in ``vlmsae/testbed/checkpoints/clip/`` (1.7 MB: safetensors, config, tokenizer), trained by this
module on CPU, deterministically from the seed and the thread count (whether the next batch is drawn on a
second thread, ``prefetch``, does not change it), by one command, the defaults of
:class:`ShapesClipConfig` (width 96, 3 vision and 2 text layers, joint space 64, batch 128, 900 steps, peak
learning rate 3e-3, patch head weight 3 on the last 2 vision layers) with 2 threads::

    python -m vlmsae.testbed train clip --threads 2

and measured with ``python -m vlmsae.testbed eval clip --n 2000``: zero-shot colour accuracy 1.0 and shape
0.982 on 2000 fresh single-object images (``reduce="mean"``: 1.0 and 0.982); on 2000 images of one to
three objects, every object's value right in reading order, 0.62 and 0.63.

Training time, measured on the quiet 2-core machine (2026-11-30, load average 1.6-2.3, no other job): the command
above took 214 s to train (3 min 43 s for the whole command, its closing evaluation on 500 images included), and
wrote a checkpoint bitwise equal to the shipped one. Earlier, under load: 316 s for the 900 steps (``--threads 2``; 327 s for the whole command, whose closing
evaluation on 500 images gave colour 1.0, shape 0.978), on 2 cores shared with 3 other training processes:
load average 5.5 when it started, 6.6 a minute in, 2.9 at the end; 288 s user + 31 s system CPU time.
On a quiet machine a step (forward, backward, AdamW) costs 0.134 s with 2 threads (0.216 s with 1);
drawing and describing the batch, 0.05 s (at load 5.8), runs on a second thread meanwhile (numpy and torch release
the GIL in most of it), so about 0.24 s a step with the two heads.

What was tried (1 thread, data drawn between steps; accuracy on 500 fresh single-object images as training
went, the last row on 1000 by :func:`evaluate_clip`; the s/step include drawing the batch and swing with
the load of the shared machine):

=================================================  =====  ===================================  ========
recipe                                             steps  shape accuracy (colour)              s/step
=================================================  =====  ===================================  ========
old default, earlier runs: lr 2e-3, head weight   1500  0.90 at 1000 steps (1.0 by 300)
  1 on the last layer; + 2 continuations of 300    2100  0.965 (1.0)                          0.29-0.34
  steps at lr 5e-4 (the old shipped model)
lr 3e-3, head weight 3 on the last 2 layers         1200  0.35 / 0.67 / 0.95 / 0.98 at 100 /      0.30
                                                          300 / 600 / 700; 0.995 (1.0) at 1200
the same, 700 steps                                  700  0.66 at 300, 0.97 at 600; 0.967 (1.0)   0.32
the same, 900 steps (the shipped recipe)             900  0.60 at 300, 0.98 at 600; 0.984 (1.0)   0.45 *
=================================================  =====  ===================================  ========

(The 1200-step run drew batches with the older, slower data code; *: at load averages of 5-6.) Colour is right after 100 steps at lr 3e-3. On images of one to three
objects the 1200, 700 and 900 step models score 0.63 / 0.61 / 0.62 for colour and 0.67 / 0.61 / 0.66 for
shape (the old model: 0.62, 0.61). Earlier, with the old default: a smaller model (width 64, 2 + 1 layers,
1800 steps) reached shape 0.79; batch 64 reached 0.68 at 1000 steps. Drawing a batch cost 0.074 s before
:func:`shapes._render_coverage` summed its 2 x 2 supersamples as integers (the same values, 4x faster).

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
Training adds throw-away linear heads that make every patch token of the vision tower's last two layers
predict the shape of the object it shows (as the captioner's does; ``patch_aux``, ``patch_aux_layers``);
they are not part of the saved model. Shape is what is slow to learn: with the old recipe, without the
head, shape accuracy was at chance (0.37) after 600 steps and with it 0.60. (An 8 x 8 grid, patch 6, with a 3x head weight and twice the learning rate, learnt
faster per step, 0.72 after 420 steps, but a step cost 1.7x; not pursued.)

The vision residual stream localises (for the next item of issue 14, scan heatmaps on vision sites): on
300 fresh images, the best single coordinate of the output of vision layer 1 (``hidden_states[1]``) ranks
the patches of each colour's objects above all other patches with AUROC 0.91-0.96; layers 2-3 do the same
for shape (0.96-0.98). (The model shipped before, trained by the older recipe: 0.93-0.97 and 0.97-0.98.) An SAE
finds less of it than on the model shipped before: in ``test_vision_site_heatmaps_put_the_hot_patches_on_the_object``
(8x, 300 steps at ``vision.blocks.0.hook_resid_post``) the best colour's latent has patch AUROC 0.844 at k 8
(the model shipped before: 0.941) and 0.910 at k 16, the test's setting (every colour >= 0.815). Measured at other
sites and settings (best / worst colour): ``vision.blocks.1`` 8x k 8: 0.852 / 0.718; ``vision.blocks.2`` 8x k 8:
0.844 / 0.780; ``vision.blocks.0.hook_resid_pre`` 8x k 8: 0.789 / 0.737; ``vision.blocks.0`` 4x k 4: 0.910 / 0.771.
A model trained with one patch head (``--patch-aux-layers 1``, otherwise the same; 201 s for the whole command
on the quiet machine) reached shape 0.972, with heatmaps 0.933 / 0.741 at 8x k 8.

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
from concurrent.futures import ThreadPoolExecutor
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

    steps: int = 900
    """Optimizer steps; each sees a fresh batch."""
    batch: int = 128
    """Image-text pairs per step (the contrastive batch)."""
    lr: float = 3e-3
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
    patch_aux: float = 3.0
    """Weight of a training-only loss that makes every patch token of the vision tower's last layer predict
    the shape of the object it shows (0: off); the head is not part of the saved model."""
    patch_aux_layers: int = 2
    """How many of the vision tower's last layers get such a head (each its own, each weighted ``patch_aux``)."""
    seed: int = TRAIN_SEED
    """Seeds the weights, the training images and the choice of descriptions."""
    threads: int = 1
    """``torch.set_num_threads`` while training (the model shipped: 2; the default, 1, leaves a core of a
    shared 2-core machine to other jobs, where 2 threads have at times run 6-10x slower per step)."""
    prefetch: int = 1
    """1: draw the next batch on a second thread while a step trains; 0: draw it between steps. The batches,
    and so the model, are the same either way."""
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
        if not 1 <= self.patch_aux_layers <= self.vision_layers:
            raise ConfigError(f"patch_aux_layers={self.patch_aux_layers} must be in 1..vision_layers={self.vision_layers}")
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
          patch_heads: list[torch.nn.Linear] = (), patch_targets: torch.Tensor | None = None,
          patch_aux: float = 0.0) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with the target of each row spread over all its true matches; plus
    ``patch_aux`` times each patch head's cross-entropy (the heads read the last ``len(patch_heads)`` vision
    layers, the last head the last layer)."""
    out = model(**inputs, output_hidden_states=bool(patch_heads))
    logits = out.logits_per_image  # (images, texts), scaled by the learnt temperature
    target = match.float()
    image_to_text = F.cross_entropy(logits, target / target.sum(1, keepdim=True))
    text_to_image = F.cross_entropy(logits.T, (target / target.sum(0, keepdim=True)).T)
    loss = (image_to_text + text_to_image) / 2
    hidden = out.vision_model_output.hidden_states
    for head, h in zip(patch_heads, hidden[len(hidden) - len(patch_heads):] if patch_heads else ()):
        # hidden_states[-1] is the last layer's output before post_layernorm, as last_hidden_state
        patches = h[:, 1:]  # (batch, patches, d_model), CLS dropped
        loss = loss + patch_aux * F.cross_entropy(head(patches.reshape(-1, patches.shape[-1])), patch_targets)
    return loss


def train_clip(out: str | Path | None = CLIP_DIR, cfg: ShapesClipConfig | None = None, on_step=None,
               ) -> tuple[CLIPModel, PreTrainedTokenizerFast]:
    """Train Shapes-CLIP; save it (and its tokenizer) to ``out`` atomically unless ``None``.

    ``on_step(step, model)``, if given, is called after every optimizer step (e.g. to measure the model as
    it learns; it must leave the model in train mode and draw no torch random numbers)."""
    cfg = cfg or ShapesClipConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = build_clip_tokenizer()
    if cfg.init:
        model = CLIPModel.from_pretrained(cfg.init, local_files_only=True)
    else:
        model = CLIPModel(clip_config(cfg, tokenizer))
    patch_heads = [torch.nn.Linear(cfg.d_model, 1 + len(shapes.SHAPES))
                   for _ in range(cfg.patch_aux_layers if cfg.patch_aux else 0)]
    params = list(model.parameters()) + [p for head in patch_heads for p in head.parameters()]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    def batch(step: int):  # a function of (cfg, step) only: no torch random numbers, safe on another thread
        samples = shapes.make_samples(cfg.batch, cfg.seed + step)
        descriptions = _training_descriptions(samples, np.random.default_rng([cfg.seed + step, 0xC11]), cfg.p_full)
        return (clip_inputs(samples, tokenizer, [d.text for d in descriptions]), match_matrix(samples, descriptions),
                _patch_targets(samples, cfg.patch) if patch_heads else None)

    model.train()
    bar = tqdm(range(cfg.steps), desc="train clip", mininterval=2.0)
    ema = None
    # The next batch is drawn on a second thread while this step trains (numpy and torch release the GIL).
    pool = ThreadPoolExecutor(1) if cfg.prefetch else None
    pending = pool.submit(batch, 0) if pool else None
    for step in bar:
        if pool:
            inputs, match, patch_targets = pending.result()
            if step + 1 < cfg.steps:
                pending = pool.submit(batch, step + 1)
        else:
            inputs, match, patch_targets = batch(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = _loss(model, inputs, match, patch_heads, patch_targets, cfg.patch_aux)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100 (Radford et al. 2021, §2.5)
            model.logit_scale.clamp_(0, math.log(100))
        value = loss.item()  # CPU training: a host sync per step costs nothing here
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        bar.set_postfix(loss=f"{ema:.4f}", refresh=False)
        if on_step is not None:
            on_step(step, model)
    if pool:
        pool.shutdown()
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
