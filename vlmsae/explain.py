"""Labels for SAE latents from what a vision-language model says about their images, and scores for the labels.

The recipe of the text auto-interpretation tools (EleutherAI's delphi, SAEBench's autointerp: explain a latent
from its top-activating examples, then score the explanation by *detection*, whether it picks the firing
examples among non-firing ones), made for images and for an explainer that answers questions (issue 16):

- :func:`explain`: each latent's ``n_top`` top examples and ``n_negative`` examples on which it does not fire
  (both from a ``scan(..., peaks=True)``) go to the explainer, which is asked each question of its question set
  about each. Where the scan has heatmaps (image-token and vision-tower sites) a top example is shown
  *focused*: the box around the patches at or above half its peak, one patch wider on every side, with the
  rest of the image filled with its median colour (a crop that keeps the image's size and layout, so a model
  trained on whole images still reads it). Each answer is split into phrases (on "and" and commas, lower
  case, punctuation dropped); the label is the (question, phrase) that the largest share of the top examples'
  answers name minus the share of the non-firing examples' answers that name it (the *contrast*). Every
  prompt and answer is kept with the label.
- :func:`score_detection`: given a label, the explainer is asked the label's question about held-out firing
  and non-firing examples (whole images); "fires" is predicted where the answer names the label's phrase.
  The score is the balanced accuracy (mean of the true-positive and true-negative rates): 0.5 is chance.
- :func:`score_boxes`: localisation without masks: the explainer names a box around what the label names in each
  top example (``locate``), and the latent's heatmap is scored against it (AUROC of the patches inside).

An explainer is any object with ``questions`` (a dict: key -> question text) and ``ask(images, question)``
(a list of ``(H, W, 3)`` uint8 arrays and a key of ``questions`` -> one answer string per image).
:class:`VLMExplainer` wraps a Hugging Face VLM and its processor (``vlmsae explain --explainer DIR``); offline, the testbed's
:class:`vlmsae.testbed.explain.ShapesQAExplainer` asks the shipped Shapes QA model its standard questions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .analysis import Scan
from .errors import ConfigError
from .plots import to_rgb

FOCUS_FRACTION = 0.5
"""A focused example keeps the patches at or above this fraction of its peak (and a patch around them)."""


class Explainer(Protocol):
    """What :func:`explain` and :func:`score_detection` ask."""

    questions: Mapping[str, str]
    """Key -> the question asked (e.g. ``{"color": "what color is the shape?"}``)."""

    def ask(self, images: Sequence[np.ndarray], question: str) -> list[str]:
        """One answer per ``(H, W, 3)`` uint8 image to the question of key ``question``. An explainer whose
        ``reads_context`` is True is also given ``contexts=``: per image the text around the latent's peak, the
        peak token in ``[[ ]]`` (None for an image shown whole, without a peak)."""
        ...


def context_text(ids: Sequence[int], tokenizer=None) -> str:
    """The window of token ids around a peak (``TopExamples.tokens`` row: the peak in the middle, -1 outside the
    sequence) as text, the peak token in ``[[ ]]``; ids as numbers without a tokenizer."""
    ids = [int(i) for i in ids]
    middle = len(ids) // 2
    words = []
    for i, t in enumerate(ids):
        if t < 0:
            continue
        word = str(t) if tokenizer is None else str(tokenizer.convert_ids_to_tokens(t))
        words.append(f"[[{word}]]" if i == middle else word)
    return " ".join(words)


def phrases(answer: str) -> set[str]:
    """The phrases an answer names: split on "and" and commas, lower case, punctuation and articles dropped
    (``"A red circle and a blue square."`` -> ``{"red circle", "blue square"}``)."""
    parts = re.split(r",|\band\b", answer.lower())
    out = set()
    for part in parts:
        words = [w for w in re.findall(r"[a-z0-9]+", part) if w not in ("a", "an", "the", "it", "is")]
        if words:
            out.add(" ".join(words))
    return out


def focus(image: np.ndarray, heat: torch.Tensor) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with everything outside the box around its hot patches set to its median colour.

    ``heat`` (rows, cols): the latent's activation on each patch (a ``TopExamples.heatmap`` row). The box holds
    the patches at or above ``FOCUS_FRACTION`` of the peak, one patch wider on every side; an example whose
    heat is all zero is returned whole.
    """
    heat = heat.float()
    if not bool((heat > 0).any()):
        return image
    rows, cols = heat.shape
    h, w = image.shape[:2]
    hot = (heat >= FOCUS_FRACTION * heat.max()).nonzero()
    r0, r1 = max(int(hot[:, 0].min()) - 1, 0), min(int(hot[:, 0].max()) + 2, rows)
    c0, c1 = max(int(hot[:, 1].min()) - 1, 0), min(int(hot[:, 1].max()) + 2, cols)
    out = np.empty_like(image)
    out[...] = np.median(image.reshape(-1, 3), axis=0).astype(image.dtype)
    y0, y1, x0, x1 = r0 * h // rows, r1 * h // rows, c0 * w // cols, c1 * w // cols
    out[y0:y1, x0:x1] = image[y0:y1, x0:x1]
    return out


class _Answers:
    """The explainer's answers, each (image, question) asked once: whole images by example index, focused ones by
    (latent, example)."""

    def __init__(self, explainer: Explainer, images: Sequence, batch: int, progress: bool):
        self.explainer, self.images, self.batch, self.progress = explainer, images, batch, progress
        self.cache: dict[tuple, str] = {}

    def image(self, example: int) -> np.ndarray:
        if not 0 <= example < len(self.images):
            raise ConfigError(f"the scan's example {example} has no image: images holds {len(self.images)}; pass "
                              "the images of the scanned data, in the order it was scanned")
        return to_rgb(self.images[example])

    def get(self, keys: Sequence[tuple], make, question: str, contexts: Mapping[tuple, str] | None = None
            ) -> list[str]:
        """Answers to ``question`` for ``keys``; ``make(key)`` builds a key's image when it is not cached;
        ``contexts`` (key -> text) go to an explainer that reads them."""
        todo = [k for k in dict.fromkeys(keys) if (k, question) not in self.cache]
        reads = getattr(self.explainer, "reads_context", False)
        for start in tqdm(range(0, len(todo), self.batch), desc=f"ask {question}", leave=False,
                          disable=not self.progress or len(todo) <= self.batch):
            chunk = todo[start:start + self.batch]
            images = [make(k) for k in chunk]
            answers = self.explainer.ask(images, question, contexts=[(contexts or {}).get(k) for k in chunk]) \
                if reads else self.explainer.ask(images, question)
            if len(answers) != len(chunk):
                raise ConfigError(f"the explainer gave {len(answers)} answers for {len(chunk)} images; its ask() "
                                  "must answer every image")
            self.cache.update({(k, question): str(a) for k, a in zip(chunk, answers)})
        return [self.cache[(k, question)] for k in keys]


def _check(scan: Scan, explainer: Explainer, **counts: int) -> None:
    """Raises ConfigError unless the scan has peaks, every count (by its argument's name) is >= 1 and the
    explainer has questions."""
    if scan.peaks is None:
        raise ConfigError("the scan has no peaks: run scan(..., peaks=True) (explain picks non-firing examples "
                          "from them)")
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"{name}={n!r} must be an integer >= 1")
    if not getattr(explainer, "questions", None):
        raise ConfigError(f"the explainer {type(explainer).__name__} has no questions; give it a dict key -> "
                          "question text")


def _shares(answers: list[str]) -> dict[str, float]:
    """Phrase -> fraction of the answers that name it."""
    counts: dict[str, int] = {}
    for answer in answers:
        for phrase in phrases(answer):
            counts[phrase] = counts.get(phrase, 0) + 1
    return {p: c / max(len(answers), 1) for p, c in counts.items()}


@torch.no_grad()
def explain(scan: Scan, images: Sequence, explainer: Explainer, *, latents: Sequence[int] | None = None,
            n_top: int = 8, n_negative: int = 8, use_focus: bool = True, tokenizer=None, seed: int = 0,
            batch: int = 128, progress: bool = True) -> pd.DataFrame:
    """A label per latent from the explainer's answers about its top and non-firing examples.

    ``scan``: from ``vlmsae.scan(..., peaks=True)`` with at least ``n_top`` examples per latent;
    ``images[i]`` is example ``i`` of the scanned data (PIL images, or arrays / tensors ``(3, H, W)`` or
    ``(H, W, 3)``); ``latents`` defaults to every scanned latent. Non-firing examples are drawn at random
    (``seed``) among those with a peak of 0; focusing (``use_focus``) applies where the scan has heatmaps. Each
    top example's text around the peak (:func:`context_text`, with ``tokenizer``'s tokens) is kept in the
    transcript and given to an explainer that reads it (``reads_context``).

    Returns a DataFrame indexed by latent: ``label`` (``"question: phrase"``, e.g. ``"color: red"``; None for a
    latent that fired on no example), ``question``, ``phrase``, ``contrast``, ``top_share``,
    ``negative_share``, ``examples`` and ``negatives`` (example indices shown), ``focused`` (bool) and
    ``transcript`` (a list of ``{"example", "focused", "context", "question", "prompt", "answer"}``; context None
    for a non-firing example).

    Raises:
        ConfigError: the scan has no peaks, a latent was not scanned, an example has no image, ``n_top`` or
            ``n_negative`` < 1, the explainer has no questions or answers fewer images than asked.
    """
    _check(scan, explainer, n_top=n_top, n_negative=n_negative)
    top = scan.top
    chosen = top.latents.tolist() if latents is None else [int(v) for v in latents]
    answers = _Answers(explainer, images, batch, progress)
    generator = torch.Generator().manual_seed(seed)
    rows = {}
    reads = getattr(explainer, "reads_context", False)
    for latent in tqdm(chosen, desc="explain", disable=not progress):
        row = top.row(latent)
        values, index = top.values[row, :n_top], top.example[row, :n_top]
        places = [(j, int(e)) for j, (e, v) in enumerate(zip(index, values)) if e >= 0 and v > 0]
        shown = [e for _, e in places]
        silent = (scan.peaks[row] <= 0).nonzero().view(-1)
        negatives = silent[torch.randperm(len(silent), generator=generator)[:n_negative]].sort().values.tolist()
        heats = top.heatmap(row) if use_focus else None
        focused = heats is not None
        # keys: (latent, example, place among the top) for a focused image or one shown with its peak's context,
        # (None, example, None) for a whole one
        top_keys = [(latent, e, j) if focused or reads else (None, e, None) for j, e in places]
        context = {key: context_text(top.tokens[row, j], tokenizer) for key, (j, _) in zip(top_keys, places)}
        make_top = lambda key: focus(answers.image(key[1]), heats[key[2]]) if focused \
            else answers.image(key[1])  # noqa: E731
        neg_keys = [(None, e, None) for e in negatives]
        transcript, best = [], None
        for key, question in explainer.questions.items():
            said = answers.get(top_keys, make_top, key, context)
            unsaid = answers.get(neg_keys, lambda k: answers.image(k[1]), key)
            asked = getattr(explainer, "prompt", lambda key, context: question)  # the text a VLMExplainer asks
            transcript += [{"example": e, "focused": focused, "context": context[k], "question": key,
                            "prompt": asked(key, context[k]), "answer": a} for e, k, a in zip(shown, top_keys, said)]
            transcript += [{"example": e, "focused": False, "context": None, "question": key, "prompt": question,
                            "answer": a} for e, a in zip(negatives, unsaid)]
            on, off = _shares(said), _shares(unsaid)
            for phrase, share in on.items():
                candidate = (share - off.get(phrase, 0.0), share, key, phrase)
                if best is None or candidate[:2] > best[:2]:
                    best = candidate
        contrast, share, key, phrase = best if best is not None else (0.0, 0.0, None, None)
        rows[latent] = {"label": None if key is None else f"{key}: {phrase}", "question": key, "phrase": phrase,
                        "contrast": contrast, "top_share": share,
                        "negative_share": share - contrast, "examples": shown, "negatives": negatives,
                        "focused": focused, "transcript": transcript}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("latent")


@torch.no_grad()
def score_detection(explanations: pd.DataFrame, scan: Scan, images: Sequence, explainer: Explainer, *,
                    n: int = 16, labels: Mapping[int, tuple[str, str]] | None = None, seed: int = 1,
                    batch: int = 128, progress: bool = True) -> pd.DataFrame:
    """Detection score of each label: does its question's answer pick the firing examples among non-firing ones?

    For each latent of ``explanations`` (from :func:`explain` on the same ``scan`` and ``images``): up to ``n``
    firing and ``n`` non-firing examples not shown to the explainer, drawn at random (``seed``); the explainer
    is asked the label's question about each whole image and predicts "fires" where its answer names the
    label's phrase. ``labels`` (latent -> (question key, phrase)) scores other labels instead, e.g. shuffled
    ones, as a control.

    Returns a DataFrame indexed by latent: ``label``, ``detection`` (balanced accuracy in [0, 1]; 0.5 is
    chance; NaN where either side has no example), ``true_positive_rate``, ``true_negative_rate``,
    ``n_firing``, ``n_silent`` (counts) and ``firing``, ``silent`` (the example indices asked about).

    Raises:
        ConfigError: as :func:`explain`; a label's question is not one of the explainer's.
    """
    _check(scan, explainer, n=n)
    answers = _Answers(explainer, images, batch, progress)
    generator = torch.Generator().manual_seed(seed)
    rows = {}
    for latent, row in tqdm(explanations.iterrows(), total=len(explanations), desc="score", disable=not progress):
        key, phrase = labels[latent] if labels is not None else (row["question"], row["phrase"])
        if key is None:
            rows[latent] = {"label": None, "detection": float("nan"), "true_positive_rate": float("nan"),
                            "true_negative_rate": float("nan"), "n_firing": 0, "n_silent": 0, "firing": [],
                            "silent": []}
            continue
        if key not in explainer.questions:
            raise ConfigError(f"label question {key!r} of latent {latent} is not one of the explainer's: "
                              f"{list(explainer.questions)}")
        peaks = scan.peaks[scan.top.row(int(latent))]
        shown = set(row["examples"]) | set(row["negatives"])
        pick = lambda mask: [e for e in mask.nonzero().view(-1)[torch.randperm(int(mask.sum()), generator=generator)]  # noqa: E731
                             .tolist() if e not in shown][:n]
        firing, silent = pick(peaks > 0), pick(peaks <= 0)
        said = answers.get([(None, e, None) for e in firing + silent], lambda k: answers.image(k[1]), key)
        named = [phrase in phrases(a) for a in said]
        tpr = float(np.mean(named[:len(firing)])) if firing else float("nan")
        tnr = float(np.mean([not v for v in named[len(firing):]])) if silent else float("nan")
        rows[latent] = {"label": f"{key}: {phrase}", "detection": (tpr + tnr) / 2, "true_positive_rate": tpr,
                        "true_negative_rate": tnr, "n_firing": len(firing), "n_silent": len(silent),
                        "firing": firing, "silent": silent}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("latent")


class VLMExplainer:
    """A Hugging Face vision-language model as an :class:`Explainer`: each question asked through its processor's
    chat template (:func:`vlmsae.data.hf_processor`), answered greedily.

    ``model``: a decoder VLM (LLaVA, Qwen-VL, Gemma 3, ...; ``vlmsae.load_model``); ``questions``: key -> question
    (default :data:`QUESTIONS`); ``max_new_tokens``: the longest answer; ``show_context``: a top example's
    question also quotes the text around the latent's peak (:meth:`prompt`). Raises ConfigError (from
    ``hf_processor``) when no processor can be found for the model offline.
    """

    def __init__(self, model, processor=None, questions: Mapping[str, str] | None = None, max_new_tokens: int = 12,
                 show_context: bool = True):
        from .data import hf_processor

        self.model, self.max_new_tokens, self.reads_context = model, max_new_tokens, show_context
        self.questions = dict(QUESTIONS if questions is None else questions)
        self.to_inputs = hf_processor(model, processor)
        self.tokenizer = self.to_inputs.tokenizer
        if self.tokenizer is None:
            raise ConfigError(f"{type(model).__name__} has no tokenizer to read answers with; an explainer must be "
                              "a VLM that writes text (a captioner cannot answer questions)")

    def prompt(self, question: str, context: str | None = None) -> str:
        """The text asked: the question of key ``question``, with the text around the peak when there is one."""
        text = self.questions[question]
        if context is None or not self.reads_context:
            return text
        return f'{text} (The image came with the text "{context}"; the part in [[ ]] is where it matters.)'

    @torch.no_grad()
    def ask(self, images: Sequence[np.ndarray], question: str, contexts: Sequence[str | None] | None = None
            ) -> list[str]:
        if question not in self.questions:
            raise ConfigError(f"question {question!r} is not one of this explainer's: {list(self.questions)}")
        if not images:
            return []
        contexts = [None] * len(images) if contexts is None else contexts
        return self._generate(images, [self.prompt(question, c) for c in contexts], self.max_new_tokens)

    def _generate(self, images: Sequence[np.ndarray], prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers to one prompt per image."""
        from PIL import Image

        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"  # answers start where every prompt ends
        try:
            inputs = self.to_inputs([Image.fromarray(im) for im in images], prompts)
        finally:
            self.tokenizer.padding_side = side
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return [t.strip() for t in self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                               skip_special_tokens=True)]

    @torch.no_grad()
    def locate(self, images: Sequence[np.ndarray], phrase: str) -> list[str]:
        """Per image, the model's answer to where ``phrase`` is, asked for a box (read by :func:`parse_box`)."""
        question = (f"Where is the {phrase} in this image? Answer with its box as four numbers x0 y0 x1 y1, "
                    "fractions of the image's width and height.")
        return self._generate(images, [question] * len(images), 24) if images else []


QUESTIONS = {
    "object": "What is the main object in this image? Answer in a few words.",
    "color": "What color is the main object? Answer in one word.",
    "shape": "What shape is the main object? Answer in one word.",
    "scene": "Where is this? Answer in a few words.",
}
"""The questions a :class:`VLMExplainer` asks by default."""


def parse_box(answer: str) -> tuple[float, float, float, float] | None:
    """The first four numbers of an answer as a box ``(x0, y0, x1, y1)`` in fractions of the image's width and
    height (numbers above 1 are read as percent); None when the answer holds fewer than four, or no area."""
    numbers = [float(v) for v in re.findall(r"\d+(?:\.\d+)?", answer)[:4]]
    if len(numbers) < 4:
        return None
    if max(numbers) > 1:
        numbers = [v / 100 for v in numbers]
    x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in numbers)
    x0, x1, y0, y1 = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


@torch.no_grad()
def score_boxes(explanations: pd.DataFrame, scan: Scan, images: Sequence, explainer) -> pd.Series:
    """Localisation on data without masks: the explainer names a box around what each label names in each top
    example (``explainer.locate(images, phrase)`` -> one answer per image, read by :func:`parse_box`), and the
    latent's heatmap is scored against it: AUROC of the patches whose centre is inside the box above the others,
    over the top examples with a box. NaN for a latent without heatmaps or label, or with no box named; all NaN
    for an explainer without ``locate``."""
    from .metrics import auroc

    answers = _Answers(explainer, images, batch=1, progress=False)  # reads the images as arrays
    out = {}
    for latent, row in explanations.iterrows():
        heats = scan.top.heatmap(scan.top.row(int(latent)))
        if heats is None or row["phrase"] is None or not hasattr(explainer, "locate"):
            out[latent] = float("nan")
            continue
        said = explainer.locate([answers.image(e) for e in row["examples"]], row["phrase"])
        pos, neg = [], []
        for heat, answer in zip(heats, said):
            box = parse_box(answer)
            if box is None:
                continue
            rows, cols = heat.shape
            cy = (torch.arange(rows) + 0.5) / rows
            cx = (torch.arange(cols) + 0.5) / cols
            inside = ((cy[:, None] >= box[1]) & (cy[:, None] <= box[3]) & (cx[None, :] >= box[0])
                      & (cx[None, :] <= box[2]))
            pos.append(heat[inside].float())
            neg.append(heat[~inside].float())
        pos, neg = (torch.cat(pos), torch.cat(neg)) if pos else (torch.zeros(0), torch.zeros(0))
        out[latent] = float(auroc(pos[:, None], neg[:, None])) if len(pos) and len(neg) else float("nan")
    return pd.Series(out, name="box_localisation", dtype=float).rename_axis("latent")
