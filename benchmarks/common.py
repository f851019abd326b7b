"""Shared pieces of the benchmark scripts: timing, argument set, the models to time."""

from __future__ import annotations

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
        model, inputs = llava_7b(dtype, device)
        yield "llava-1.5-7b shapes", model, inputs
        del model


def llava_7b(dtype, device, batch: int = 4, text: int = 64):
    """LLaVA-1.5-7B's shapes with random weights (a 7B decoder over 576 image tokens from a CLIP-L/336 tower)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                                max_position_embeddings=4096),
        image_token_index=32000, image_seq_length=576, vision_feature_layer=-2, pad_token_id=0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(10, 32000, (batch, 1 + 576 + text))
    ids[:, 0] = 1
    ids[:, 1:577] = 32000
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(batch, 3, 336, 336, dtype=dtype)}
    return model, {k: v.to(device) for k, v in inputs.items()}
