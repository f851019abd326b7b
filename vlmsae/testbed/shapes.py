"""Shapes: synthetic images whose every concept is known, for testing that SAE features mean something.

An image is ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB with one to three objects on a noisy,
tinted, shaded background. Each object has a colour (hue, saturation and brightness
jittered), a shape, a size (small or large, continuous within each) and a quadrant
(top/bottom x left/right, continuous jitter inside it). Objects sit in distinct quadrants
and never overlap, so every pixel and every patch has at most one owner.

Everything is a deterministic function of a seed: :func:`make_samples` ``(n, seed)``.

Text grammar (fixed, one token per concept word)
------------------------------------------------
Objects are listed in reading order of their quadrants: top left, top right, bottom left,
bottom right. One object reads ``a {size} {color} {shape} at the {top|bottom} {left|right}``;
the caption joins the objects with ``and``::

    a small red circle at the top left and a large blue square at the bottom right

Questions (:data:`QUESTIONS`) apply to every image. Where an image has several objects the
answer lists every object's value in the same reading order, joined by ``and``::

    what color is the shape?    -> red and blue
    what shape is it?           -> circle and square
    where is it?                -> top left and bottom right
    how big is it?              -> small and large
    how many shapes are there?  -> two

Token layout (the zoo's ids, :mod:`vlmsae.zoo`): ``0 <pad> 1 <bos> 2 <eos> 3 <image>
4 <vision_start> 5 <vision_end> 6 <video> 7 <unk>``, then words. Sequences:

- captioner (ViT-GPT2) decoder: ``<bos> caption <eos>``;
- QA (LLaVA): ``<bos> <image> x N_PATCHES question answer <eos>``.

:func:`concept_sites` gives, per sample, the token index of every concept word in that
sequence; the position that *predicts* the word is one before it.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ..errors import ConfigError

IMAGE_SIZE = 48  # pixels, square
PATCH = 8  # the testbed models' patch: a 6 x 6 grid
GRID = IMAGE_SIZE // PATCH
N_PATCHES = GRID * GRID  # image tokens LLaVA puts in the decoder stream
QUADRANT = IMAGE_SIZE // 2
MAX_OBJECTS = 3

COLORS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
VERTICAL = ("top", "bottom")
HORIZONTAL = ("left", "right")
CONCEPTS = {"color": COLORS, "shape": SHAPES, "size": SIZES, "vertical": VERTICAL, "horizontal": HORIZONTAL}
"""Per-object concepts and their values; every value is one word and one token."""
COUNTS = ("one", "two", "three")

_HUE = {"red": 0.0, "green": 0.33, "blue": 0.62, "yellow": 0.15, "purple": 0.79}
_HUE_JITTER = 0.025
_RADIUS = {"small": (4.5, 6.0), "large": (8.0, 10.5)}  # half the object's extent, pixels

QUESTIONS = {
    "color": "what color is the shape?",
    "shape": "what shape is it?",
    "position": "where is it?",
    "size": "how big is it?",
    "count": "how many shapes are there?",
}
"""The standard question set, keyed by what it asks."""

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>", "<vision_start>", "<vision_end>", "<video>", "<unk>")
PAD, BOS, EOS, IMAGE, VISION_START, VISION_END, VIDEO, UNK = range(8)
WORDS = ("a", "at", "the", "and", *SIZES, *COLORS, *SHAPES, *VERTICAL, *HORIZONTAL, *COUNTS,
         "what", "color", "is", "shape", "?", "it", "where", "how", "big", "many", "shapes", "are", "there")


@dataclass(frozen=True)
class ShapeObject:
    """One object of an image, with its ground truth."""

    color: str
    shape: str
    size: str
    vertical: str
    """``top`` or ``bottom``."""
    horizontal: str
    """``left`` or ``right``."""
    cx: float
    """Centre column, pixels."""
    cy: float
    """Centre row, pixels."""
    radius: float
    """Half the object's extent, pixels."""
    rgb: tuple[float, float, float]
    """Its fill colour in [0, 1] (before pixel noise)."""

    @property
    def position(self) -> str:
        return f"{self.vertical} {self.horizontal}"

    def value(self, concept: str) -> str:
        """This object's value of ``concept`` (a key of :data:`CONCEPTS`)."""
        return getattr(self, concept)

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} at the {self.position}"


@dataclass(frozen=True)
class ConceptSite:
    """Where a concept word sits in a model's token sequence."""

    obj: int
    """Index of the object in ``Sample.objects``; -1 for the image-level count."""
    concept: str
    """``color``, ``shape``, ``size``, ``vertical``, ``horizontal`` or ``count``."""
    value: str
    token: int
    """Index of the word's token in the unpadded sequence (0 is the first token, e.g. ``<bos>``)."""

    @property
    def predict(self) -> int:
        """The position whose next-token prediction is this word."""
        return self.token - 1


@dataclass(frozen=True)
class Sample:
    """One image and all of its ground truth."""

    image: np.ndarray
    """``(3, IMAGE_SIZE, IMAGE_SIZE)`` float32 in [0, 1]."""
    objects: tuple[ShapeObject, ...]
    """In caption (reading) order."""
    masks: np.ndarray
    """``(n_objects, IMAGE_SIZE, IMAGE_SIZE)`` bool: the pixels each object covers (at least half)."""

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects)

    @property
    def count(self) -> str:
        return COUNTS[len(self.objects) - 1]

    def answer(self, question: str) -> str:
        """The answer to ``question``: a key of :data:`QUESTIONS` or one of its values."""
        key = _question_key(question)
        if key == "count":
            return self.count
        if key == "position":
            return " and ".join(o.position for o in self.objects)
        return " and ".join(o.value(key) for o in self.objects)

    @property
    def answers(self) -> dict[str, str]:
        """Answers to the whole question set, keyed like :data:`QUESTIONS`."""
        return {key: self.answer(key) for key in QUESTIONS}

    def has(self, value: str) -> bool:
        """Image-level label: does any object have concept value ``value`` (e.g. ``"red"``)?"""
        return any(value in (o.color, o.shape, o.size, o.vertical, o.horizontal) for o in self.objects)

    def patch_coverage(self, patch: int = PATCH) -> np.ndarray:
        """``(n_objects, H/patch, W/patch)`` float: the fraction of each patch each object covers."""
        if IMAGE_SIZE % patch:
            raise ConfigError(f"patch={patch} must divide IMAGE_SIZE={IMAGE_SIZE}")
        g = IMAGE_SIZE // patch
        m = self.masks.reshape(len(self.objects), g, patch, g, patch)
        return m.mean(axis=(2, 4))

    def patch_labels(self, patch: int = PATCH) -> np.ndarray:
        """``(H/patch, W/patch)`` int: the object each patch shows (any pixel of it), -1 for background.

        Objects sit in distinct quadrants and patches never straddle two objects' pixels
        for the default patch, so the owner is unique; with other patches the larger
        coverage wins.
        """
        cov = self.patch_coverage(patch)
        owner = cov.argmax(0)
        return np.where(cov.max(0) > 0, owner, -1)


def _question_key(question: str) -> str:
    if question in QUESTIONS:
        return question
    for key, text in QUESTIONS.items():
        if question == text:
            return key
    raise ConfigError(f"question={question!r} is not in the question set; choose a key or value of {QUESTIONS}")


def _render_coverage(shape: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by one object per image, 2x2 supersampled. Arrays are (B,)."""
    s = (np.arange(2 * IMAGE_SIZE, dtype=np.float32) + 0.5) / 2  # subpixel centres, pixel units
    x = s[None, None, :] - cx[:, None, None]
    y = s[None, :, None] - cy[:, None, None]
    r = r[:, None, None]
    circle = x * x + y * y <= r * r
    square = (np.abs(x) <= 0.9 * r) & (np.abs(y) <= 0.9 * r)  # about a circle's area
    # Upward isosceles triangle, base 2r and height 2r.
    triangle = (y <= r) & (np.abs(x) <= (y + r) / 2)
    k = shape[:, None, None]
    inside = np.where(k == 0, circle, np.where(k == 1, square, triangle)).view(np.uint8)
    # The mean of each 2 x 2 block, exactly (a count of 0-4 times 0.25), 4x faster than a float mean over a
    # reshape of the bool array.
    rows = inside[:, 0::2] + inside[:, 1::2]
    return (rows[:, :, 0::2] + rows[:, :, 1::2]).astype(np.float32) * np.float32(0.25)


def make_samples(n: int, seed: int) -> list[Sample]:
    """``n`` samples, a deterministic function of ``(n, seed)``; different seeds give unrelated samples."""
    if n < 1:
        raise ConfigError(f"n={n} must be >= 1")
    rng = np.random.default_rng([seed, 0x5A9E5])
    count = rng.integers(1, MAX_OBJECTS + 1, n)
    # Distinct quadrants (0 TL, 1 TR, 2 BL, 3 BR): the first `count` of a random permutation, sorted into
    # reading order; unused slots sort last.
    order = np.argsort(rng.random((n, 4)), axis=1)[:, :MAX_OBJECTS]
    valid = np.arange(MAX_OBJECTS)[None, :] < count[:, None]
    quads = np.sort(np.where(valid, order, 99), axis=1)
    color = rng.integers(0, len(COLORS), (n, MAX_OBJECTS))
    shape = rng.integers(0, len(SHAPES), (n, MAX_OBJECTS))
    size = rng.integers(0, len(SIZES), (n, MAX_OBJECTS))
    u_r, u_x, u_y = rng.random((3, n, MAX_OBJECTS))
    hue_j = rng.uniform(-_HUE_JITTER, _HUE_JITTER, (n, MAX_OBJECTS))
    sat = rng.uniform(0.7, 1.0, (n, MAX_OBJECTS))
    val = rng.uniform(0.7, 1.0, (n, MAX_OBJECTS))

    # Background: a desaturated grey with a tint, a linear shade and per-pixel noise.
    grey = rng.uniform(0.2, 0.45, (n, 1, 1, 1))
    tint = rng.uniform(-0.04, 0.04, (n, 3, 1, 1))
    angle = rng.uniform(0, 2 * np.pi, n)
    amp = rng.uniform(0.0, 0.12, n)
    coords = (np.arange(IMAGE_SIZE) + 0.5) / IMAGE_SIZE - 0.5
    shade = (np.cos(angle)[:, None, None] * coords[None, None, :] + np.sin(angle)[:, None, None] * coords[None, :, None])
    image = (grey + tint + (amp[:, None, None] * shade)[:, None]).astype(np.float32)  # (n, 3, H, W)
    noise = rng.standard_normal((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32) * np.float32(0.05)

    lo = np.array([_RADIUS[s][0] for s in SIZES])
    hi = np.array([_RADIUS[s][1] for s in SIZES])
    radius = lo[size] + u_r * (hi[size] - lo[size])
    q = np.minimum(quads, 3)
    qx, qy = (q % 2) * QUADRANT, (q // 2) * QUADRANT
    # Keep a 1-pixel margin inside the quadrant so objects never touch.
    span = QUADRANT - 2 * (radius + 1)
    cx = qx + radius + 1 + u_x * span
    cy = qy + radius + 1 + u_y * span
    rgb = np.zeros((n, MAX_OBJECTS, 3))
    for i in range(n):
        for j in range(count[i]):
            hue = (_HUE[COLORS[color[i, j]]] + hue_j[i, j]) % 1.0
            rgb[i, j] = colorsys.hsv_to_rgb(hue, sat[i, j], val[i, j])
    masks = np.zeros((n, MAX_OBJECTS, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for j in range(MAX_OBJECTS):
        cov = _render_coverage(shape[:, j], cx[:, j].astype(np.float32), cy[:, j].astype(np.float32),
                               radius[:, j].astype(np.float32))
        cov = cov * valid[:, j, None, None]
        image += cov[:, None] * (rgb[:, j, :, None, None].astype(np.float32) - image)
        masks[:, j] = cov >= 0.5
    image = np.clip(image + noise, 0.0, 1.0)

    samples = []
    for i in range(n):
        objects = tuple(
            ShapeObject(
                color=COLORS[color[i, j]], shape=SHAPES[shape[i, j]], size=SIZES[size[i, j]],
                vertical=VERTICAL[q[i, j] // 2], horizontal=HORIZONTAL[q[i, j] % 2],
                cx=float(cx[i, j]), cy=float(cy[i, j]), radius=float(radius[i, j]),
                rgb=tuple(float(c) for c in rgb[i, j]),
            )
            for j in range(count[i])
        )
        samples.append(Sample(image=image[i], objects=objects, masks=masks[i, : count[i]].copy()))
    return samples


def to_pil(sample: Sample):
    """The sample's image as a PIL image (for reports and eyeballing)."""
    from PIL import Image

    return Image.fromarray((sample.image.transpose(1, 2, 0) * 255).round().astype(np.uint8))


# ---------------------------------------------------------------------------------------- tokenizer


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer of the Shapes grammar, built offline.

    Ids follow the zoo's layout (0 pad, 1 bos, 2 eos, 3 image, 4 vision_start, 5 vision_end,
    6 video), then 7 ``<unk>`` and the words of :data:`WORDS`. It adds no special tokens
    itself: the input builders lay sequences out explicitly.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # also splits "?" off a word
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="right",
    )


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for text, row in zip(texts, ids):
        if UNK in row:
            raise ConfigError(f"text {text!r} has words outside the Shapes vocabulary")
    return ids


def _pad(rows: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if side == "right":
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        else:
            out[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
    return out


def pixel_values(samples: list[Sample]) -> torch.Tensor:
    """``(batch, 3, IMAGE_SIZE, IMAGE_SIZE)`` float32, normalised to [-1, 1] as the testbed models expect."""
    x = torch.from_numpy(np.stack([s.image for s in samples]))
    return (x - 0.5) / 0.5


def captioner_inputs(samples: list[Sample], tokenizer, *, labels: bool = True) -> dict[str, torch.Tensor]:
    """Inputs for the ViT-GPT2 captioner, right-padded.

    With ``labels``: ``pixel_values``, ``decoder_input_ids`` (``<bos> caption``),
    ``decoder_attention_mask`` and ``labels`` (``caption <eos>``, -100 on padding), so that
    ``decoder_input_ids`` position t predicts ``labels`` position t. Sequence positions
    match :func:`concept_sites` (``<bos>`` is position 0). Without ``labels``: only
    ``pixel_values``, ready for ``model.generate(**inputs)``.
    """
    pixels = pixel_values(samples)
    if not labels:
        return {"pixel_values": pixels}
    words = _encode(tokenizer, [s.caption for s in samples])
    ids = _pad([[BOS] + w for w in words], PAD)
    mask = _pad([[1] * (len(w) + 1) for w in words], 0)
    target = _pad([w + [EOS] for w in words], -100)
    return {"pixel_values": pixels, "decoder_input_ids": ids, "decoder_attention_mask": mask, "labels": target}


def qa_inputs(samples: list[Sample], tokenizer, questions: str | list[str], *, labels: bool = True,
              ) -> dict[str, torch.Tensor]:
    """Inputs for the LLaVA QA model: ``<bos> <image> x N_PATCHES question [answer <eos>]``.

    ``questions``: one question (a key or value of :data:`QUESTIONS`) for every sample, or
    one per sample. With ``labels``: right-padded ``input_ids``, ``attention_mask``,
    ``pixel_values`` and ``labels`` (the answer and ``<eos>`` at the positions that hold them,
    -100 elsewhere; the model shifts them itself). Without ``labels``: the prompts only,
    left-padded, for ``model.generate(**inputs)`` (a batch with one question needs no padding).
    """
    if isinstance(questions, str):
        questions = [questions] * len(samples)
    if len(questions) != len(samples):
        raise ConfigError(f"{len(questions)} questions for {len(samples)} samples; give one or one per sample")
    q_text = [QUESTIONS[_question_key(q)] for q in questions]
    q_ids = _encode(tokenizer, q_text)
    prompts = [[BOS] + [IMAGE] * N_PATCHES + q for q in q_ids]
    pixels = pixel_values(samples)
    if not labels:
        ids = _pad(prompts, PAD, side="left")
        mask = _pad([[1] * len(p) for p in prompts], 0, side="left")
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    a_ids = _encode(tokenizer, [s.answer(q) for s, q in zip(samples, questions)])
    rows = [p + a + [EOS] for p, a in zip(prompts, a_ids)]
    target = [[-100] * len(p) + a + [EOS] for p, a in zip(prompts, a_ids)]
    return {"input_ids": _pad(rows, PAD), "attention_mask": _pad([[1] * len(r) for r in rows], 0),
            "pixel_values": pixels, "labels": _pad(target, -100)}


def concept_sites(sample: Sample, question: str | None = None) -> list[ConceptSite]:
    """Every concept word of the sample's target text, with its token index in the model's sequence.

    ``question=None``: the captioner's decoder sequence ``<bos> caption <eos>``. A question:
    the QA sequence ``<bos> <image> x N_PATCHES question answer <eos>``. Indices are for the
    unpadded (right-padded) sequence; ``site.predict`` is the position that predicts the word.
    """
    if question is None:
        start = 1
        words = sample.caption.split()
        objs = sample.objects
        sites, i = [], 0
        for j, o in enumerate(objs):
            # a {size} {color} {shape} at the {vertical} {horizontal} [and]
            for off, concept in ((1, "size"), (2, "color"), (3, "shape"), (6, "vertical"), (7, "horizontal")):
                assert words[i + off] == o.value(concept)
                sites.append(ConceptSite(j, concept, o.value(concept), start + i + off))
            i += 9
        return sites
    key = _question_key(question)
    start = 1 + N_PATCHES + len(QUESTIONS[key].replace("?", " ?").split())
    if key == "count":
        return [ConceptSite(-1, "count", sample.count, start)]
    sites = []
    if key == "position":
        for j, o in enumerate(sample.objects):  # {vertical} {horizontal} [and]
            sites.append(ConceptSite(j, "vertical", o.vertical, start + 3 * j))
            sites.append(ConceptSite(j, "horizontal", o.horizontal, start + 3 * j + 1))
        return sites
    return [ConceptSite(j, key, o.value(key), start + 2 * j) for j, o in enumerate(sample.objects)]
