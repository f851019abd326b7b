"""Memory and correctness at real size, on CPU (issue 17 item 3).

The real configs of LLaVA-1.5-7B, Qwen2.5-VL-7B and Qwen2.5-VL-3B with random weights built directly
in bfloat16 (``_from_config(config, dtype=torch.bfloat16)``: 13.5 GB for the 7B, never a float32 copy),
one model at a time, each over one sample (one image and ``--text-len`` text tokens). For each, in
order, a check and the peak resident memory of the phase (RSS sampled every 10 ms, above what the
process held before the phase):

- build: the model in bf16;
- record: the first and middle layers captured during a forward that also asks for
  ``output_hidden_states``; the captures must be bitwise equal to them (the last entry of
  ``hidden_states`` is after the final norm);
- splice: a TopK SAE (d_sae = 4 x d_model, float32) spliced at the middle layer with the error term:
  the logits must equal the clean ones (bf16: the largest difference is printed, and must be 0);
- steer: a latent's decoder direction added at the middle layer against a plain forward hook adding
  the same vector: logits bitwise equal;
- evaluate: CE / KL / FVU / L0 of the SAE (the cross-entropy over a 152k vocabulary read a few rows
  at a time: ``vlmsae.evaluate.CHUNK_ROWS``);
- scan: every latent's top examples (one value per image token);
- train: ``vlmsae.train`` at the middle layer for a few steps (rows from forwards stopped there).

    python benchmarks/real_size.py                                # all three (minutes each on 2 CPU cores)
    python benchmarks/real_size.py --models qwen2.5-vl-3b
    python benchmarks/real_size.py --tiny                         # smoke test: the same code at toy sizes

Prints one table per model and writes nothing; the figures go into benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch

import vlmsae
from vlmsae import zoo

MODELS = ("llava-1.5-7b", "qwen2.5-vl-7b", "qwen2.5-vl-3b")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Peak:
    """The highest RSS while the block runs, above the RSS at its start (a sampling thread, every 10 ms)."""

    def __enter__(self):
        self.base = self.high = rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while self.running:
            self.high = max(self.high, rss())
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.high = max(self.high, rss())
        self.seconds = time.perf_counter() - self.t0
        self.gib = (self.high - self.base) / 2**30


def config(name: str, tiny: bool):
    """The model's config (real sizes as published; ``tiny``: the same architecture at toy sizes)."""
    from transformers import Qwen2_5_VLConfig

    if name == "llava-1.5-7b":
        import common

        return common.llava_7b_config(tiny)
    big = name == "qwen2.5-vl-7b"
    text = dict(hidden_size=3584 if big else 2048, intermediate_size=18944 if big else 11008,
                num_hidden_layers=28 if big else 36, num_attention_heads=28 if big else 16,
                num_key_value_heads=4 if big else 2, vocab_size=152064 if big else 151936,
                max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=not big,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  out_hidden_size=text["hidden_size"])
    if tiny:
        text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, rope_parameters=dict(text["rope_parameters"], mrope_section=[4, 2, 2]))
        vision.update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1],
                      out_hidden_size=64)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653, bos_token_id=151643,
                            eos_token_id=151645, pad_token_id=151643)


def inputs(name: str, cfg, text_len: int, image_px: int) -> dict:
    """One sample: BOS (LLaVA) or <vision_start> ... <vision_end> (Qwen) around the image tokens, then text."""
    g = torch.Generator().manual_seed(0)
    if name.startswith("llava"):
        import common

        return common.llava_inputs(cfg, 1, text_len, torch.bfloat16, "cpu")
    pixels = torch.rand(1, 3, image_px, image_px, generator=g) * 2 - 1
    flat, grid = zoo.qwen_patchify(pixels, patch=14, merge=2, temporal=2)
    n_image = int(grid[0, 1] * grid[0, 2]) // 4
    text = torch.randint(1000, 100000, (text_len,), generator=g).tolist()
    ids = torch.tensor([[151652] + [151655] * n_image + [151653] + text])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": flat.to(torch.bfloat16),
            "image_grid_thw": grid, "mm_token_type_ids": (ids == 151655).long()}


def run(name: str, args) -> list[tuple[str, str, float, float]]:
    """The phases of one model: (phase, check, seconds, peak GiB above the phase's start)."""
    from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    rows = []

    def phase(label, fn):
        with Peak() as p:
            verdict = fn()
        rows.append((label, verdict, p.seconds, p.gib))
        print(f"  {label:9s} {p.seconds:7.1f} s  peak +{p.gib:6.2f} GiB  {verdict}", flush=True)

    cfg = config(name, args.tiny)
    cls = LlavaForConditionalGeneration if name.startswith("llava") else Qwen2_5_VLForConditionalGeneration
    made = {}

    def build():
        made["model"] = cls._from_config(cfg, dtype=torch.bfloat16).eval()
        n = sum(p.numel() for p in made["model"].parameters())
        return f"{n / 1e9:.2f}B parameters, {sum(p.dtype == torch.bfloat16 for p in made['model'].parameters())} " \
               "bf16 tensors, none float32" if all(p.dtype == torch.bfloat16 for p in made["model"].parameters()) \
               else "FAIL: a parameter is not bf16"

    phase("build", build)
    model = made["model"]
    batch = inputs(name, cfg, args.text_len, args.image_px)
    info = vlmsae.layers(model)
    mid = info.n_layers // 2
    torch.manual_seed(0)
    sae = vlmsae.SAE(d_in=info.d_model, d_sae=4 * info.d_model, k=32)
    clean = {}

    @torch.no_grad()
    def record():
        with vlmsae.record(model, [0, mid]) as rec:
            out = model(**batch, output_hidden_states=True)
        clean["logits"] = out.logits
        same = all(torch.equal(rec[L], out.hidden_states[L + 1]) for L in (0, mid))
        return f"{batch['input_ids'].shape[1]} tokens; captures {'bitwise equal to' if same else 'FAIL: differ from'}" \
               " output_hidden_states"

    @torch.no_grad()
    def splice():
        with vlmsae.splice(model, mid, sae, use_error_term=True):
            logits = model(**batch).logits
        diff = float((logits.float() - clean["logits"].float()).abs().max())
        return f"error term: largest logit difference {diff:g}" + ("" if diff == 0 else " (FAIL: not 0)")

    @torch.no_grad()
    def steer():
        vector = 8.0 * sae.W_dec[3]
        with vlmsae.steer(model, mid, sae, latents={3: 8.0}):
            steered = model(**batch).logits
        handle = info.layers[mid].register_forward_hook(
            lambda m, a, out: (out[0] + vector.to(out[0]),) + tuple(out[1:]) if isinstance(out, tuple)
            else out + vector.to(out))
        try:
            reference = model(**batch).logits
        finally:
            handle.remove()
        return "equal to a plain hook adding the same vector" if torch.equal(steered, reference) else \
            f"FAIL: differs by {float((steered.float() - reference.float()).abs().max()):g}"

    def evaluate():
        table = vlmsae.evaluate(model, mid, sae, [batch], where=["all"], ablations=False)
        row = table.loc["all"]
        return f"ce_clean {row.ce_clean:.2f} ce_spliced {row.ce_spliced:.2f} kl {row.kl:.3f} fvu {row.fvu:.3f} " \
               f"l0 {row.l0:.1f}"

    def scan():
        found = vlmsae.scan(model, mid, sae, [batch], n_examples=4)
        return f"{found.top.latents.numel()} latents, image acts {tuple(found.top.image_acts.shape)}"

    def train():
        trainee = vlmsae.SAE(d_in=info.d_model, d_sae=4 * info.d_model, k=32)
        result = vlmsae.train(model, mid, [batch], trainee, steps=args.train_steps, batch_size=128, buffer_size=512,
                              k_start=None, warmup_steps=1, sync_every=args.train_steps, progress=False)
        last_readout = result.history[-1]
        return f"{args.train_steps} steps of 128 rows; fvu {last_readout['fvu']:.3f} l0 {last_readout['l0']:.1f}"

    for label, fn in (("record", record), ("splice", splice), ("steer", steer), ("evaluate", evaluate),
                      ("scan", scan), ("train", train)):
        phase(label, fn)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--text-len", type=int, default=24, help="text tokens after the image")
    parser.add_argument("--image-px", type=int, default=336, help="Qwen image side in pixels (336: 144 image tokens)")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="toy sizes, for a smoke test")
    args = parser.parse_args()
    if args.tiny:
        args.image_px = 56
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, RSS at start {rss() / 2**30:.2f} GiB")
    for name in args.models:
        print(f"\n{name}{' (tiny)' if args.tiny else ''}", flush=True)
        rows = run(name, args)
        print(f"\n| {name} | check | s | peak GiB above the phase's start |\n|---|---|---:|---:|")
        for label, verdict, seconds, gib in rows:
            print(f"| {label} | {verdict} | {seconds:.1f} | {gib:.2f} |")
        print(f"process peak RSS so far: {rss() / 2**30:.2f} GiB (current)", flush=True)


if __name__ == "__main__":
    main()
