"""The ``vlmsae`` command line."""

from __future__ import annotations

import argparse
import inspect
import sys

import torch
from tqdm import tqdm

from pathlib import Path

from . import distributed, zoo
from .adapters import Kind, layers, load_model, special_token_ids
from .data import ImageTextFolder, hf_processor
from .errors import SiteError, VlmsaeError
from .record import record
from .sae import ARCHITECTURES, SAE
from .sites import OUTPUT_SITES, hook_name
from .train import OnlineRunConfig, train
from .trainer import SAETrainerConfig


def zoo_command(args: argparse.Namespace) -> None:
    """Load a tiny model of each family, dual encoders included, and print every site it has: the decoder's layers
    with a summary of their recorded residuals, then each other site's hook name (at its last layer) and the shape
    recorded there."""
    rows = []
    for family in tqdm(args.families, desc="families", disable=not sys.stderr.isatty()):
        model = zoo.tiny_model(family, n_layers=args.n_layers)
        info = layers(model)
        inputs = zoo.tiny_inputs(model, batch=2, padding="left")
        if info.n_layers:
            with torch.no_grad(), record(model, range(info.n_layers)) as rec:
                model(**inputs)
            kinds = rec.kinds(0)
            counts = ", ".join(f"{k.name.lower()} {(kinds == k).sum().item()}" for k in Kind if (kinds == k).any())
            print(f"\n{family}: {type(model).__name__}, {info.n_layers} decoder layers at model.{info.layer_path}, "
                  f"d_model {info.d_model}, image tokens in the decoder stream: "
                  f"{'yes' if info.has_image_tokens else 'no (cross-attention)'}")
            print(f"  tokens: {counts}")
            for layer in range(info.n_layers):
                resid = rec[layer][kinds != Kind.PAD].float()
                print(f"  blocks.{layer}.hook_resid_post  shape {tuple(rec[layer].shape)}  "
                      f"mean norm {resid.norm(dim=-1).mean():.3f}  std {resid.std():.3f}")
        else:
            print(f"\n{family}: {type(model).__name__}, a dual encoder: no decoder; an image tower, a text tower and "
                  "their pooled embeddings")
        for site in (s for s in info.sites if not (s == "resid_post" and info.n_layers)):
            n = 0 if site in OUTPUT_SITES else len(info.stack(site).modules)
            name = hook_name(max(n - 1, 0), site)
            with torch.no_grad(), record(model, name) as rec:
                model(**inputs)
            print(f"  {name}  shape {tuple(rec[max(n - 1, 0)].shape)}" + (f"  ({n} layers)" if n else ""))
        rows.append(family)
    print(f"\nrecorded {len(rows)} families: {', '.join(rows)}")


def demo_command(args: argparse.Namespace) -> None:
    """Train, evaluate, name and steer SAE latents on the Shapes captioner (or --model), and write a report."""
    from .testbed.demo import DemoConfig, run

    cfg = DemoConfig.quick(args.out) if args.quick else DemoConfig(out=args.out)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.layers is not None:
        cfg.layers = tuple(args.layers)
    run(cfg, model_name=args.model, images=args.images)


def model_and_inputs(name: str, device: str):
    """``zoo:FAMILY`` (a tiny random model) or a local folder / hub id, with its ``(images, texts) -> inputs`` and
    the token ids that count as SPECIAL (the config's; for a folder also its tokenizer's special and chat-template
    control tokens, :func:`vlmsae.special_token_ids`)."""
    if name.startswith("zoo:"):
        model = zoo.tiny_model(name.removeprefix("zoo:")).to(device)
        return model, zoo.processor(model), special_token_ids(model)
    model = load_model(name, device=device)
    to_inputs = hf_processor(model)
    return model, to_inputs, special_token_ids(model, to_inputs.tokenizer)


def _layer_arg(text: str) -> int | str:
    """``--layer`` values: a layer index, or a hook name of any site (``vision.blocks.3.hook_resid_post``)."""
    return int(text) if text.lstrip("-").isdigit() else text


def train_command(args: argparse.Namespace) -> None:
    """Train SAEs online on decoder layers of a model over a folder of images and texts.

    Under ``torchrun --nproc_per_node N`` (or ``accelerate launch``) each rank loads its own replica
    (``--device cuda`` becomes ``cuda:LOCAL_RANK``) and trains on every N-th data batch; ``--batch-size``
    and ``--buffer-size`` stay global, ``--data-batch`` is images per forward on each rank. ``--parallel
    layers`` gives each rank whole layers instead (each SAE on one rank, rows sent to it by every rank).
    """
    from .sites import parse_site

    parsed = [parse_site(L, args.site) for L in args.layer]  # a bad --layer / --site fails before the model loads
    if len({site for _, site in parsed}) > 1:
        raise SiteError(f"--layer {' '.join(map(str, args.layer))} names several sites; train one site per run")
    indices, site = [L for L, _ in parsed], parsed[0][1]
    world = distributed.init_from_env()
    model, to_inputs, special_ids = model_and_inputs(args.model, distributed.local_device(world, args.device))
    width = layers(model).width(site)
    data = ImageTextFolder(args.data, to_inputs, batch_size=args.data_batch)
    if args.kind is not None:
        print("vlmsae train: --kind is deprecated and will be removed in vlmsae 0.3; use --architecture",
              file=sys.stderr)
        args.architecture = args.kind
    saes = {L: SAE(d_in=width, d_sae=args.expansion * width, k=args.k, architecture=args.architecture)
            for L in indices}
    cfg = OnlineRunConfig(steps=args.steps, batch_size=args.batch_size, buffer_size=args.buffer_size,
                          checkpoint_every=args.checkpoint_every, wandb=args.wandb, seed=args.seed,
                          kinds=tuple(args.kinds), quota=args.quota, parallel=args.parallel, site=site,
                          special_ids=special_ids)
    train(model, indices, data, saes, cfg=cfg, trainer_cfg=SAETrainerConfig(lr=args.lr), out=args.out,
          resume=args.resume)
    for L in indices if world is None or world.main else ():
        print(f"wrote {Path(args.out) / f'L{L}'}")


def _sae_and_data(args: argparse.Namespace):
    """The model, the SAE (``--sae``), its layer and site (``--layer``, else the SAE's ``hook_name``), the data
    folder's batches (the first ``--batches``), the folder itself, the number of images read and the model's
    SPECIAL token ids. Raises ``ConfigError`` for a bad argument."""
    from itertools import islice

    from .errors import ConfigError
    from .sites import parse_site

    sae = SAE.load(args.sae)
    hook = args.layer if args.layer is not None else sae.metadata.get("hook_name")
    if hook is None:
        raise ConfigError(f"{args.sae} names no hook_name in its metadata; pass --layer (a decoder layer index or a "
                          "hook name such as blocks.9.hook_resid_post)")
    layer, site = parse_site(_layer_arg(str(hook)))
    if args.batches is not None and args.batches < 1:
        raise ConfigError(f"--batches {args.batches} must be at least 1")
    model, to_inputs, special_ids = model_and_inputs(args.model, args.device)
    sae = sae.to(args.device)
    folder = ImageTextFolder(args.data, to_inputs, batch_size=args.data_batch)
    n = len(folder) if args.batches is None else min(args.batches, len(folder))
    return model, sae, layer, site, list(islice(folder, n)), folder, n * args.data_batch, special_ids


def evaluate_command(args: argparse.Namespace) -> None:
    """Evaluate an SAE folder on a model over a folder of images: CE clean / spliced / ablated, KL, FVU, L0."""
    from .errors import ConfigError
    from .evaluate import evaluate
    from .files import write_text_atomic

    if args.out is not None and not args.out.endswith(".json"):
        raise ConfigError(f"--out {args.out!r} must end in .json (the table is written as JSON)")
    model, sae, layer, site, batches, _, _, special_ids = _sae_and_data(args)
    table = evaluate(model, layer, sae, tqdm(batches, desc="batches", disable=not sys.stderr.isatty()),
                     where=args.where, site=site, special_ids=special_ids)
    print(table.to_string(float_format="{:.4f}".format))
    if args.out is not None:  # computed first: a failure above writes nothing
        write_text_atomic(args.out, table.to_json(orient="index", indent=1))
        print(f"wrote {args.out}")


def dashboard_command(args: argparse.Namespace) -> None:
    """Scan an SAE over a folder of images and write its latent dashboard (one self-contained HTML page)."""
    from PIL import Image

    from .analysis import scan
    from .dashboard import write_dashboard
    from .errors import ConfigError

    if not args.out.endswith(".html"):
        raise ConfigError(f"--out {args.out!r} must end in .html")
    model, sae, layer, site, batches, folder, n_images, special_ids = _sae_and_data(args)
    found = scan(model, layer, sae, tqdm(batches, desc="scan", disable=not sys.stderr.isatty()),
                 n_examples=args.n_examples, latents=args.latents, site=site, special_ids=special_ids)
    names = folder.table[folder.image_column].iloc[:n_images]
    images = [Image.open(folder.folder / name).convert("RGB") for name in names]
    path = write_dashboard(args.out, found, images, latents=args.latents,
                           title=f"{Path(args.sae).name}: {found.top.latents.numel()} latents")
    print(f"wrote {path}")


def explain_command(args: argparse.Namespace) -> None:
    """Label SAE latents: an explainer VLM answers questions about each latent's top and non-firing images; each
    label is then scored by detection on held-out images."""
    from PIL import Image

    from .analysis import scan
    from .errors import ConfigError
    from .explain import VLMExplainer, explain, score_detection
    from .files import write_text_atomic

    if not args.out.endswith(".json"):
        raise ConfigError(f"--out {args.out!r} must end in .json (the labels, scores and transcripts)")
    if args.explainer == "shapes-qa":
        from .testbed.explain import ShapesQAExplainer

        explainer = ShapesQAExplainer()
    else:
        explainer = VLMExplainer(load_model(args.explainer, device=args.device))
    model, sae, layer, site, batches, folder, n_images, special_ids = _sae_and_data(args)
    found = scan(model, layer, sae, tqdm(batches, desc="scan", disable=not sys.stderr.isatty()),
                 n_examples=args.n_top, latents=args.latents, site=site, special_ids=special_ids, peaks=True)
    names = folder.table[folder.image_column].iloc[:n_images]
    images = [Image.open(folder.folder / name).convert("RGB") for name in names]
    table = explain(found, images, explainer, n_top=args.n_top, n_negative=args.n_negative,
                    tokenizer=getattr(folder.to_inputs, "tokenizer", None))  # the text around each peak, as tokens
    scores = score_detection(table, found, images, explainer, n=args.n_score)
    table = table.join(scores[["detection", "n_firing", "n_silent"]])
    print(table[["label", "contrast", "detection"]].to_string(float_format="{:.3f}".format))
    write_text_atomic(args.out, table.reset_index().to_json(orient="records", indent=1))  # computed first
    print(f"wrote {args.out}")


def _sae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a local model folder, a hub id, or zoo:FAMILY")
    p.add_argument("--sae", required=True, help="an SAE folder (vlmsae / SAELens / sparsify)")
    p.add_argument("--data", required=True, help="a folder of images with captions.jsonl / .parquet")
    p.add_argument("--layer", default=None, help="layer index or hook name (default: the SAE's hook_name)")
    p.add_argument("--batches", type=int, default=None, help="read only the first N batches")
    p.add_argument("--data-batch", type=int, default=8, help="images per model forward")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")


def _doc(command) -> dict:
    """A command's ``help`` (its docstring's first paragraph) and ``description`` (all of it), without reST quotes."""
    text = inspect.cleandoc(command.__doc__).replace("``", "")
    return {"help": text.split("\n\n")[0], "description": text}


def main(argv: list[str] | None = None) -> None:
    """The vlmsae command line: train, evaluate and explain SAEs on vision-language models, and the demo."""
    parser = argparse.ArgumentParser(prog="vlmsae", description=_doc(main)["description"])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the whole pipeline: train, evaluate, name and steer SAE latents, report")
    p.add_argument("--out", default="vlmsae-demo", help="folder for the SAE and report.html")
    p.add_argument("--model", default=None, help="your model: a local folder or hub id (default: the Shapes captioner)")
    p.add_argument("--images", default=None, help="with --model: a folder of images with captions.jsonl / .parquet")
    p.add_argument("--steps", type=int, default=None, help="SAE training steps")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="decoder layers, one SAE each (default: a middle one and the last)")
    p.add_argument("--quick", action="store_true",
                   help="a shortened run: 150 steps instead of 800, smaller samples (what CI runs)")
    p.set_defaults(run=demo_command)
    p = sub.add_parser("zoo", **_doc(zoo_command))
    p.add_argument("--families", nargs="+", default=list(zoo.FAMILIES + zoo.DUAL_ENCODERS),
                   choices=zoo.FAMILIES + zoo.DUAL_ENCODERS)
    p.add_argument("--n-layers", type=int, default=4, help="decoder layers of each tiny model (default %(default)s)")
    p.set_defaults(run=zoo_command)
    p = sub.add_parser("train", **_doc(train_command))
    p.add_argument("--model", required=True, help="a local model folder, a hub id, or zoo:FAMILY")
    p.add_argument("--data", required=True, help="a folder of images with captions.jsonl / .parquet")
    p.add_argument("--layer", type=_layer_arg, nargs="+", required=True,
                   help="decoder layer indices (at --site), or hook names of one site: vision.blocks.3.hook_resid_post, "
                        "hook_image_embeds, ... (the README's site table)")
    p.add_argument("--site", default="resid_post",
                   help="site of integer --layer values: resid_post, resid_pre, vision.resid_post, text.resid_post, ...")
    p.add_argument("--out", required=True, help="folder for the SAEs and checkpoints")
    p.add_argument("--steps", type=int, default=1000, help="SAE training steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4096,
                   help="tokens per SAE step, global: under N ranks each reads batch-size / N (default %(default)s)")
    p.add_argument("--buffer-size", type=int, default=65536,
                   help="rows of each layer's ring buffer, filled before the first step, global: under N ranks "
                        "each holds buffer-size / N (default %(default)s)")
    p.add_argument("--data-batch", type=int, default=8,
                   help="images per model forward, on each rank (default %(default)s)")
    p.add_argument("--architecture", default="topk", choices=ARCHITECTURES, help="how latents activate")
    p.add_argument("--kind", default=None, choices=ARCHITECTURES, help=argparse.SUPPRESS)  # old name of --architecture
    p.add_argument("--k", type=int, default=32, help="latents kept per token, TopK's k (default %(default)s)")
    p.add_argument("--expansion", type=int, default=8, help="d_sae = expansion x d_model (default %(default)s)")
    p.add_argument("--kinds", nargs="+", default=["image", "text", "generated"],
                   help="token kinds to train on (default: %(default)s)")
    p.add_argument("--quota", default=None, choices=("balanced",),
                   help="balanced: equal shares of image and text rows in the buffers (default: the data's own mix, "
                        "printed when the buffers first fill)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default 2e-4 / sqrt(d_sae / 2**14), as Gao et al. 2024)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints in --out (default: none)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--wandb", default=None, help="a wandb project to log to")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the buffers' shuffles (default %(default)s)")
    p.add_argument("--parallel", default="data", choices=("data", "layers"),
                   help="under N ranks: every rank trains every SAE on its share of each batch (data), or each "
                        "rank trains only its layers, fed by every rank's forwards (layers)")
    p.set_defaults(run=train_command)
    p = sub.add_parser("evaluate", **_doc(evaluate_command))
    _sae_args(p)
    p.add_argument("--where", nargs="+", default=None, help="spliced positions: all, image, text (default: each)")
    p.add_argument("--out", default=None, help="also write the table to this .json file")
    p.set_defaults(run=evaluate_command)
    p = sub.add_parser("dashboard", **_doc(dashboard_command))
    _sae_args(p)
    p.add_argument("--out", required=True, help="the .html page to write")
    p.add_argument("--latents", type=int, nargs="+", default=None, help="only these latents (default: all)")
    p.add_argument("--n-examples", type=int, default=8, help="top examples kept per latent")
    p.set_defaults(run=dashboard_command)
    p = sub.add_parser("explain", **_doc(explain_command))
    _sae_args(p)
    p.add_argument("--latents", type=int, nargs="+", required=True,
                   help="the latents to label (each costs the explainer one answer per image and question)")
    p.add_argument("--explainer", required=True,
                   help="a VLM folder or hub id that answers questions about images, or shapes-qa (the testbed's)")
    p.add_argument("--out", required=True, help="the .json file of labels, detection scores and transcripts")
    p.add_argument("--n-top", type=int, default=8, help="top examples shown per latent")
    p.add_argument("--n-negative", type=int, default=8, help="non-firing examples shown per latent")
    p.add_argument("--n-score", type=int, default=16, help="held-out firing and non-firing examples scored")
    p.set_defaults(run=explain_command)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (VlmsaeError, ValueError, OSError) as err:
        parser.exit(2, f"vlmsae {args.command}: {err}\n")


if __name__ == "__main__":
    main()
