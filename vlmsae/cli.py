"""The ``vlmsae`` command line."""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from . import zoo
from .adapters import Kind, layers
from .record import record


def demo(args: argparse.Namespace) -> None:
    """Load a tiny model of each family, print its decoder layers and a summary of recorded residuals."""
    rows = []
    for family in tqdm(args.families, desc="families", disable=not sys.stderr.isatty()):
        model = zoo.tiny_model(family, n_layers=args.n_layers)
        info = layers(model)
        inputs = zoo.tiny_inputs(model, batch=2, padding="left")
        with torch.no_grad(), record(model, range(info.n_layers)) as rec:
            model(**inputs)
        kinds = rec.mask(0)
        counts = ", ".join(f"{k.name.lower()} {(kinds == k).sum().item()}" for k in Kind if (kinds == k).any())
        print(f"\n{family}: {type(model).__name__}, {info.n_layers} decoder layers at model.{info.layer_path}, "
              f"d_model {info.d_model}, image tokens in the decoder stream: "
              f"{'yes' if info.has_image_tokens else 'no (cross-attention)'}")
        print(f"  tokens: {counts}")
        for layer in range(info.n_layers):
            resid = rec[layer][kinds != Kind.PAD].float()
            print(f"  blocks.{layer}.hook_resid_post  shape {tuple(rec[layer].shape)}  "
                  f"mean norm {resid.norm(dim=-1).mean():.3f}  std {resid.std():.3f}")
        rows.append(family)
    print(f"\nrecorded {len(rows)} families: {', '.join(rows)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vlmsae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help=demo.__doc__)
    p.add_argument("--families", nargs="+", default=list(zoo.FAMILIES), choices=zoo.FAMILIES)
    p.add_argument("--n-layers", type=int, default=4)
    p.set_defaults(run=demo)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
