"""``python -m vlmsae.testbed train|eval captioner|qa|clip``: train a testbed model and save it, or measure one.

Every field of the model's config (:class:`~vlmsae.testbed.models.TestbedModelConfig`,
:class:`~vlmsae.testbed.clip.ShapesClipConfig`) is an option of ``train``: ``--d-model 64``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from . import clip, models


class TestbedModel(NamedTuple):
    """How the command line trains, loads and measures one testbed model."""

    config: type
    folder: Path
    train: Callable
    load: Callable
    evaluate: Callable


TESTBED_MODELS = {
    "captioner": TestbedModel(models.TestbedModelConfig, models.CAPTIONER_DIR, models.train_captioner,
                              models.load_captioner, models.evaluate_captioner),
    "qa": TestbedModel(models.TestbedModelConfig, models.QA_DIR, models.train_qa, models.load_qa,
                       models.evaluate_qa),
    "clip": TestbedModel(clip.ShapesClipConfig, clip.CLIP_DIR, clip.train_clip, clip.load_clip,
                         clip.evaluate_clip),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlmsae.testbed", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a testbed model and save it")
    tr.add_argument("model", choices=list(TESTBED_MODELS))
    tr.add_argument("--out", type=Path, help="folder (default: the shipped one)")
    options: dict[str, dict[str, dataclasses.Field]] = {}  # option -> model -> its field (same type in each)
    for name, entry in TESTBED_MODELS.items():
        for field in dataclasses.fields(entry.config):
            options.setdefault(field.name, {})[name] = field
    for option, fields in options.items():
        default = next(iter(fields.values())).default
        tr.add_argument(f"--{option.replace('_', '-')}", type=type(default), default=None,
                        help="default: " + ", ".join(f"{name} {f.default!r}" for name, f in fields.items()))
    ev = sub.add_parser("eval", help="accuracy on fresh samples")
    ev.add_argument("model", choices=list(TESTBED_MODELS))
    ev.add_argument("--path", type=Path, help="folder (default: the shipped one)")
    ev.add_argument("--n", type=int, default=1000)
    ev.add_argument("--seed", type=int, default=models.EVAL_SEED)
    args = parser.parse_args(argv)
    entry = TESTBED_MODELS[args.model]
    if args.command == "train":
        given = {f: getattr(args, f) for f in options if getattr(args, f) is not None}
        if foreign := sorted(f for f in given if args.model not in options[f]):
            parser.error(f"{', '.join('--' + f.replace('_', '-') for f in foreign)} do not apply to {args.model}")
        out = args.out or entry.folder
        t0 = time.perf_counter()
        model, tok = entry.train(out, entry.config(**given))
        print(f"trained {args.model} in {time.perf_counter() - t0:.0f} s -> {out}")
        print({k: round(v, 4) for k, v in entry.evaluate(model, tok, n=500).items()})
        return
    torch.set_num_threads(2)
    model, tok = entry.load(args.path or entry.folder)
    print({k: round(v, 4) for k, v in entry.evaluate(model, tok, n=args.n, seed=args.seed).items()})


if __name__ == "__main__":
    main()
