"""Shared pieces of the benchmark scripts: timing, argument set, the models to time."""

from __future__ import annotations

import itertools
import statistics
import time

import torch

from vlmsae import zoo


def timer(device: torch.device):
    """A clock that waits for the device first, so that a GPU time is the work's, not the launch's."""
    def now():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


def median_times(variants: dict, repeats: int, now) -> dict[str, float]:
    """Median seconds of each variant, running them in turn within every repeat (drift hits all alike)."""
    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = now()
            fn()
            times[name].append(now() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def add_model_args(parser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--families", nargs="+", default=list(zoo.FAMILIES))
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--llava-7b", action="store_true", help="also LLaVA-1.5-7B shapes, random weights (GPU)")


def cases(args, device, dtype):
    """Yield ``(name, model, inputs)`` for each zoo family at the benchmark's size, then LLaVA-1.5-7B's shapes
    with ``--llava-7b``; one model alive at a time."""
    for family in args.families:
        model = zoo.tiny_model(family, n_layers=args.n_layers, d_model=args.d_model, vocab_size=4096)
        model = model.to(device, dtype)
        inputs = zoo.tiny_inputs(model, args.batch, text_len=args.text_len, padding="left")
        yield f"{family} d={args.d_model} L={args.n_layers}", model, {k: v.to(device) for k, v in inputs.items()}
        del model
    if args.llava_7b:
        model, inputs = llava_7b(dtype, device, batch=args.batch, text=args.text_len)
        yield "llava-1.5-7b shapes", model, inputs
        del model


def llava_7b_config(tiny: bool = False):
    """LLaVA-1.5-7B's config (Llama-2-7B text model, CLIP ViT-L/14-336 tower, 576 image tokens), or with
    ``tiny`` the same architecture at toy sizes (4 text layers of width 64, 4 image tokens) for CPU smoke tests."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tiny:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=28, patch_size=14, projection_dim=32)
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096)
        image_tokens = 4
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                           rms_norm_eps=1e-5)
        image_tokens = 576
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                       image_seq_length=image_tokens, vision_feature_layer=-2, pad_token_id=0)


def llava_inputs(config, batch: int, text: int, dtype, device, seed: int = 0) -> dict:
    """One LLaVA batch: BOS, one placeholder per image patch, ``text`` random text tokens; random pixels."""
    g = torch.Generator().manual_seed(seed)
    n_image, size = config.image_seq_length, config.vision_config.image_size
    ids = torch.randint(10, 32000, (batch, 1 + n_image + text), generator=g)
    ids[:, 0] = 1
    ids[:, 1:1 + n_image] = config.image_token_index
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(batch, 3, size, size, generator=g).to(dtype)}
    return {k: v.to(device) for k, v in inputs.items()}


def llava_7b(dtype, device, batch: int = 4, text: int = 64, *, tiny: bool = False):
    """LLaVA-1.5-7B's shapes with random weights (a 7B decoder over 576 image tokens from a CLIP-L/336 tower),
    built directly in ``dtype`` on ``device`` (no float32 copy on the way); ``tiny``: the same at toy sizes."""
    from transformers import LlavaForConditionalGeneration

    config = llava_7b_config(tiny)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config.pad_token_id = 0
    return model, llava_inputs(config, batch, text, dtype, device)


def fill(model, layer: int, batches, buffer, forwards) -> None:
    """Forwards over ``batches`` (cycled, ``forwards`` an ``itertools.count`` shared across calls) that record
    ``layer`` with early stop into ``buffer`` until it is full. One host sync per forward (``free_rows``), as in
    training's fill."""
    import vlmsae

    with torch.no_grad():
        while buffer.free_rows():
            with vlmsae.record(model, [layer], stop=True, sink=buffer.sink()):
                model(**batches[next(forwards) % len(batches)])


def harvest_rate(model, layer: int, batches, rows: int, capacity: int, now) -> tuple[float, int]:
    """Harvest alone: :func:`fill` a fresh ``RingBuffer(capacity)`` again and again until at least ``rows`` rows
    were kept. Returns (kept rows per second, forwards)."""
    import vlmsae

    d_model = vlmsae.layers(model).d_model
    device = next(model.parameters()).device
    kept, forwards = 0, itertools.count()
    t0 = now()
    while kept < rows:
        buffer = vlmsae.RingBuffer(capacity, d_model, device=device)
        fill(model, layer, batches, buffer, forwards)
        kept += int(buffer.kept)
    return kept / (now() - t0), next(forwards)
