"""Tiny random-weight VLMs of the real architecture classes, and valid inputs for them.

No hub access: every model is built from config objects. The models are the genuine
transformers classes (``VisionEncoderDecoderModel``, ``LlavaForConditionalGeneration``,
``Qwen2VLForConditionalGeneration``, ...), so anything that works on them works on a
real checkpoint of the same family.

All families share one small vocabulary layout so that tests can reason about ids::

    0 <pad>   1 <bos>   2 <eos>   3 <image>   4 <vision_start>   5 <vision_end>   6 <video>
    7 .. vocab_size-1   ordinary text tokens

Ids 4 and 5 are each family's begin / end of image: Qwen's ``<|vision_start|>`` / ``<|vision_end|>``, Gemma 3's
``<start_of_image>`` / ``<end_of_image>``, Idefics3's and SmolVLM's ``<fake_token_around_image>`` /
``<global-img>`` (which only their tokenizer names: :func:`tokenizer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    Gemma2Config,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GPT2Config,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
)

from .errors import ConfigError

PAD, BOS, EOS, IMAGE, VISION_START, VISION_END, VIDEO = range(7)
FIRST_TEXT_ID = 7

FAMILIES = ("vit-gpt2", "llava", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "gemma3", "paligemma", "idefics3", "smolvlm")
"""The VLMs: a decoder that reads images, generates and gives logits."""
DUAL_ENCODERS = ("clip", "siglip")
"""The dual encoders: an image tower and a text tower, no decoder (``logits_per_image``, no ``generate``)."""

IMAGE_SIZE = 32  # pixels, square
PATCH = 8  # ViT / CLIP / PaliGemma's SigLIP patch: (32 / 8)^2 = 16 patches, one image token each
QWEN_PATCH = 4  # Qwen patch: (32 / 4)^2 = 64 patches, 2x2 merge -> 16 image tokens
QWEN_MERGE = 2
QWEN_TEMPORAL = 2
SMALL_PATCH = 4  # Gemma 3 (2x2 average pool) and Idefics3 / SmolVLM (2x2 pixel shuffle): 64 patches -> 16 tokens
MERGE = 2

_N_IMG = (IMAGE_SIZE // PATCH) ** 2  # 16 image tokens per image in every family with image tokens


@dataclass(frozen=True)
class Layout:
    """How a zoo family lays out one sample's prompt, and what else its forward wants."""

    model_type: str
    prefix: tuple[int, ...]
    """Ids before the text; ``IMAGE`` stands for the image's ``_N_IMG`` placeholders."""
    pixels: str
    """``pixel_values``: ``"images"`` ``(n, C, H, W)``, ``"qwen"`` flattened patches with ``image_grid_thw``,
    ``"per_sample"`` ``(n, 1, C, H, W)`` (Idefics3 / SmolVLM: images per sample)."""
    token_types: str | None = None
    """Keyword of the token types the forward wants with images (1 at image placeholders), or ``None``."""
    prefix_types: bool = False
    """Token types mark the prefix instead: 0 for the prompt, 1 for what follows it (PaliGemma's prefix-LM)."""
    randomised: tuple[str, ...] = ()
    """Parameters transformers initialises to zero that would cut the image off; the tiny model draws them."""


LAYOUTS = {
    "vit-gpt2": Layout("vision-encoder-decoder", (BOS,), "images"),
    "llava": Layout("llava", (BOS, IMAGE), "images"),
    "qwen2-vl": Layout("qwen2_vl", (VISION_START, IMAGE, VISION_END), "qwen", "mm_token_type_ids"),
    "qwen2.5-vl": Layout("qwen2_5_vl", (VISION_START, IMAGE, VISION_END), "qwen", "mm_token_type_ids"),
    "qwen3-vl": Layout("qwen3_vl", (VISION_START, IMAGE, VISION_END), "qwen", "mm_token_type_ids"),
    # processing_gemma3.py: <bos> ... <start_of_image> <image_soft_token>... <end_of_image>; token_type_ids 1 at
    # the image, where Gemma 3 attends bidirectionally
    "gemma3": Layout("gemma3", (BOS, VISION_START, IMAGE, VISION_END), "images", "token_type_ids",
                     randomised=("model.multi_modal_projector.mm_input_projection_weight",)),
    # processing_paligemma.py: <image>... <bos> prompt; token_type_ids 0 over the prefix (bidirectional), 1 after
    "paligemma": Layout("paligemma", (IMAGE, BOS), "images", "token_type_ids", prefix_types=True),
    # processing_idefics3.py: <fake_token_around_image> <global-img> <image>... <fake_token_around_image>
    "idefics3": Layout("idefics3", (BOS, VISION_START, VISION_END, IMAGE, VISION_START), "per_sample"),
    "smolvlm": Layout("smolvlm", (BOS, VISION_START, VISION_END, IMAGE, VISION_START), "per_sample"),
    # dual encoders: the images and the captions side by side, one caption per image (<bos> text)
    "clip": Layout("clip", (BOS,), "images"),
    "siglip": Layout("siglip", (BOS,), "images"),
}


def image_token_count(family: str) -> int:
    """Image tokens one image contributes to the decoder stream (0 where images enter by cross-attention, and in a
    dual encoder, which has no decoder)."""
    return 0 if family == "vit-gpt2" or family in DUAL_ENCODERS else _N_IMG


def tiny_config(family: str, *, n_layers: int = 4, d_model: int = 64, vocab_size: int = 128):
    """The config object of a tiny model of ``family`` (one of ``FAMILIES`` or ``DUAL_ENCODERS``).

    A dual encoder's ``n_layers`` and ``d_model`` are its text tower's; its vision tower has 2 layers of ``d_model``,
    and CLIP projects both into ``d_model // 2`` (SigLIP's heads keep ``d_model``)."""
    if family not in FAMILIES + DUAL_ENCODERS:
        raise ConfigError(f"family={family!r} is not in the zoo; choose one of {FAMILIES + DUAL_ENCODERS}")
    if d_model % 16:
        raise ConfigError(f"d_model={d_model} must be a multiple of 16 (4 heads of a head_dim divisible by 4)")
    heads = 4
    head_dim = d_model // heads
    common_text = dict(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    if family == "vit-gpt2":
        encoder = ViTConfig(
            hidden_size=d_model, num_hidden_layers=2, num_attention_heads=heads, intermediate_size=2 * d_model,
            image_size=IMAGE_SIZE, patch_size=PATCH,
        )
        decoder = GPT2Config(
            vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers, n_head=heads, n_positions=512,
            add_cross_attention=True, is_decoder=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        )
        config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
        config.decoder_start_token_id = BOS
        config.pad_token_id = PAD
        config.eos_token_id = EOS
        return config
    if family == "llava":
        vision = CLIPVisionConfig(
            hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=2, num_attention_heads=heads,
            image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=d_model,
        )
        return LlavaConfig(
            vision_config=vision, text_config=LlamaConfig(**common_text, head_dim=head_dim),
            image_token_index=IMAGE, image_seq_length=image_token_count(family),
            vision_feature_layer=-1, vision_feature_select_strategy="default",
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        )
    siglip = dict(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=2, num_attention_heads=heads,
                  image_size=IMAGE_SIZE, patch_size=SMALL_PATCH)
    if family in DUAL_ENCODERS:
        text = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
                    num_hidden_layers=n_layers, num_attention_heads=heads, max_position_embeddings=64,
                    bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
        if family == "clip":
            return CLIPConfig(text_config=text, projection_dim=d_model // 2,
                              vision_config=dict(siglip, patch_size=PATCH, projection_dim=d_model // 2))
        return SiglipConfig(text_config=dict(text, projection_size=d_model), vision_config=dict(siglip, patch_size=PATCH))
    if family == "gemma3":
        text = Gemma3TextConfig(**common_text, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention"] * (n_layers // 2)
                                + ["sliding_attention"] * (n_layers % 2))
        return Gemma3Config(text_config=text, vision_config=SiglipVisionConfig(**siglip), mm_tokens_per_image=_N_IMG,
                            image_token_index=IMAGE, boi_token_index=VISION_START, eoi_token_index=VISION_END)
    if family == "paligemma":  # PaliGemma 2: a Gemma 2 decoder
        text = Gemma2Config(**common_text, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=8)
        return PaliGemmaConfig(text_config=text, vision_config=SiglipVisionConfig(**dict(siglip, patch_size=PATCH)),
                               image_token_index=IMAGE, projection_dim=d_model, hidden_size=d_model)
    if family in ("idefics3", "smolvlm"):
        config, vision = (Idefics3Config, Idefics3VisionConfig) if family == "idefics3" else \
            (SmolVLMConfig, SmolVLMVisionConfig)
        return config(text_config=LlamaConfig(**common_text, head_dim=head_dim), vision_config=vision(**siglip),
                      image_token_id=IMAGE, scale_factor=MERGE, pad_token_id=PAD)
    # Qwen: multimodal rotary sections (t, h, w) must sum to head_dim / 2.
    half = head_dim // 2
    mrope = [half - 2 * (half // 4), half // 4, half // 4]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)
    vision_common = dict(
        depth=2, num_heads=heads, in_channels=3, patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE,
        temporal_patch_size=QWEN_TEMPORAL,
    )
    if family == "qwen2-vl":
        vision = dict(vision_common, embed_dim=d_model, hidden_size=d_model, mlp_ratio=2)
        text = dict(common_text, rope_parameters=rope)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "qwen2.5-vl":
        vision = dict(vision_common, hidden_size=d_model, intermediate_size=2 * d_model, out_hidden_size=d_model,
                      window_size=2 * QWEN_PATCH * QWEN_MERGE, fullatt_block_indexes=[1])
        text = dict(common_text, rope_parameters=rope)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    vision = dict(vision_common, hidden_size=d_model, intermediate_size=2 * d_model, out_hidden_size=d_model,
                  num_position_embeddings=(IMAGE_SIZE // QWEN_PATCH) ** 2, deepstack_visual_indexes=[0, 1])
    text = dict(common_text, head_dim=head_dim, rope_parameters=dict(rope, mrope_interleaved=True))
    return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)


_CLASSES = {
    "vit-gpt2": VisionEncoderDecoderModel,
    "llava": LlavaForConditionalGeneration,
    "qwen2-vl": Qwen2VLForConditionalGeneration,
    "qwen2.5-vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3-vl": Qwen3VLForConditionalGeneration,
    "gemma3": Gemma3ForConditionalGeneration,
    "paligemma": PaliGemmaForConditionalGeneration,
    "idefics3": Idefics3ForConditionalGeneration,
    "smolvlm": SmolVLMForConditionalGeneration,
    "clip": CLIPModel,
    "siglip": SiglipModel,
}


def tiny_model(family: str, *, n_layers: int = 4, d_model: int = 64, vocab_size: int = 128, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A tiny random-weight model of ``family`` (``FAMILIES`` or ``DUAL_ENCODERS``) in eval mode, deterministic in
    ``seed``."""
    config = tiny_config(family, n_layers=n_layers, d_model=d_model, vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = _CLASSES[family](config)
    with torch.no_grad():
        for name in LAYOUTS[family].randomised:  # else every image gives the same (zero) soft tokens
            param = model.get_parameter(name)
            param.copy_(torch.randn(param.shape) / param.shape[0] ** 0.5)
    model = model.to(dtype).eval()
    if family in DUAL_ENCODERS:
        return model  # no decoder: nothing generates
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    # A random model would happily emit <image> or <bos>; keep generated tokens text, so that a generated
    # sequence is always valid input again (LLaVA checks image tokens against image features).
    model.generation_config.suppress_tokens = list(range(FIRST_TEXT_ID))
    if family == "vit-gpt2":
        model.generation_config.decoder_start_token_id = BOS
    return model


def family_of_config(config) -> str:
    """The zoo family name of a config built by :func:`tiny_config` (or a real checkpoint's config)."""
    names = {layout.model_type: family for family, layout in LAYOUTS.items()}
    if config.model_type not in names:
        raise ConfigError(f"model_type={config.model_type!r} has no zoo inputs; zoo families: {FAMILIES}")
    return names[config.model_type]


# What each family's tokenizer calls the image placeholder and the begin / end of image (ids 3, 4, 5).
_IMAGE_NAMES = {
    "qwen2-vl": ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"),
    "gemma3": ("<image_soft_token>", "<start_of_image>", "<end_of_image>"),
    "idefics3": ("<image>", "<fake_token_around_image>", "<global-img>"),
}
_IMAGE_NAMES.update({"qwen2.5-vl": _IMAGE_NAMES["qwen2-vl"], "qwen3-vl": _IMAGE_NAMES["qwen2-vl"],
                     "smolvlm": _IMAGE_NAMES["idefics3"]})


def tokenizer(model: PreTrainedModel):
    """An offline tokenizer (WordLevel, no hub) over the zoo's id layout, with the family's own token names.

    Ids 3, 4, 5 carry the family's names for the image placeholder and the begin / end of image
    (``<|vision_start|>``, ``<start_of_image>``, ``<fake_token_around_image>``, ...); text id ``i`` is
    ``t{i}``. Only ``<pad>``, ``<bos>``, ``<eos>`` and the image placeholder are marked special, as a real
    tokenizer may leave a chat template's control tokens unmarked.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    family = family_of_config(model.config)
    image, start, end = _IMAGE_NAMES.get(family, ("<image>", "<vision_start>", "<vision_end>"))
    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, image: IMAGE, start: VISION_START, end: VISION_END,
             "<video>": VIDEO}
    vocab.update({f"t{i}": i for i in range(FIRST_TEXT_ID, model.config.get_text_config().vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   extra_special_tokens=[image], name_or_path=f"vlmsae-zoo-{family}")


def qwen_patchify(images: torch.Tensor, patch: int = QWEN_PATCH, merge: int = QWEN_MERGE,
                  temporal: int = QWEN_TEMPORAL) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten images ``(n, C, H, W)`` into Qwen-VL patches and their ``image_grid_thw``.

    The order is the one Qwen's image processor uses: patches run over the grid in
    ``merge x merge`` blocks, so that consecutive groups of ``merge**2`` patches form one
    image token after the vision tower's spatial merge. A still image is repeated
    ``temporal`` times along time.
    """
    n, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.unsqueeze(1).expand(n, temporal, c, h, w)  # (n, t, C, H, W)
    # one row per patch, merge x merge blocks of patches in a row; each row is (C, t, P, P) flattened
    flat = rearrange(x, "n t c (bh mh ph) (bw mw pw) -> (n bh bw mh mw) (c t ph pw)", mh=merge, ph=patch, mw=merge,
                     pw=patch)
    grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.long)
    return flat, grid


def tiny_inputs(model: PreTrainedModel, batch: int = 2, *, text_len: int = 8, padding: str | None = "right",
                seed: int = 0, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Valid model inputs for a zoo model: one image per sample, then random text tokens.

    Sample ``i`` has ``text_len - i`` text tokens (at least 1); the rest is padding on the
    ``padding`` side ("right" or "left"; ``None`` keeps all samples at full length).
    ``images`` is an optional ``(batch, 3, 32, 32)`` tensor in [0, 1]; otherwise random pixels.
    """
    g = torch.Generator().manual_seed(seed)
    if images is None:
        images = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    vocab = model.config.get_text_config().vocab_size
    texts = [torch.randint(FIRST_TEXT_ID, vocab, (max(1, text_len - i) if padding else text_len,),
                           generator=g).tolist() for i in range(batch)]
    return build_inputs(model, images, texts, padding=padding or "right")


def build_inputs(model: PreTrainedModel, images: torch.Tensor, texts: list[list[int]], *,
                 padding: str = "left") -> dict[str, torch.Tensor]:
    """Model inputs for a zoo model from images ``(n, 3, 32, 32)`` in [0, 1] and text token ids per sample.

    Decoder-only families lay a sample out as ``<bos> [image tokens] text``
    (Qwen: ``<vision_start> <image>... <vision_end> text``); ViT-GPT2 gets the image as
    ``pixel_values`` and ``<bos> text`` as ``decoder_input_ids``. Shorter samples are padded on
    the ``padding`` side ("left" or "right").
    """
    if padding not in ("right", "left"):
        raise ConfigError(f"padding={padding!r} must be 'right' or 'left'")
    family = family_of_config(model.config)
    batch = len(texts)
    if images.shape != (batch, 3, IMAGE_SIZE, IMAGE_SIZE):
        raise ConfigError(f"images of shape {tuple(images.shape)}; the zoo expects {(batch, 3, IMAGE_SIZE, IMAGE_SIZE)}")
    layout = LAYOUTS[family]
    prefix = [i for t in layout.prefix for i in ([IMAGE] * _N_IMG if t == IMAGE else [t])]
    rows = [prefix + list(text) for text in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((batch, width), PAD, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if padding == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    pixels = (images - 0.5) / 0.5
    dtype = next(model.parameters()).dtype
    if family == "vit-gpt2":
        return {"pixel_values": pixels.to(dtype), "decoder_input_ids": ids, "decoder_attention_mask": mask}
    out = {"input_ids": ids, "attention_mask": mask}
    if layout.pixels == "qwen":
        flat, grid = qwen_patchify(pixels)
        out.update(pixel_values=flat.to(dtype), image_grid_thw=grid)
    else:
        out["pixel_values"] = (pixels[:, None] if layout.pixels == "per_sample" else pixels).to(dtype)
    if layout.token_types:
        # Qwen2-VL, Qwen3-VL and Gemma 3 want the token types (0 text, 1 image) whenever images are passed;
        # PaliGemma's mark its bidirectional prefix (0: the whole prompt).
        out[layout.token_types] = torch.zeros_like(ids) if layout.prefix_types else (ids == IMAGE).long()
    return out


def processor(model: PreTrainedModel):
    """A stand-in for a processor: ``(PIL images, texts) -> inputs`` for a zoo model, with no tokenizer files.

    Images are resized to 32x32; each word maps to a text id by a stable hash, so the same text
    always gives the same ids.
    """
    import zlib

    import numpy as np

    vocab = model.config.get_text_config().vocab_size

    def word_id(word: str) -> int:
        return FIRST_TEXT_ID + zlib.crc32(word.lower().encode()) % (vocab - FIRST_TEXT_ID)

    def to_inputs(images, texts: list[str]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)),
                                                          dtype=np.float32) / 255).permute(2, 0, 1)
                              for im in images])
        return build_inputs(model, pixels, [[word_id(w) for w in t.split()] or [FIRST_TEXT_ID] for t in texts])

    return to_inputs


def with_sequences(model: PreTrainedModel, inputs: dict[str, torch.Tensor], sequences: torch.Tensor,
                   ) -> dict[str, torch.Tensor]:
    """Inputs for one uncached forward over ``sequences`` (``inputs`` extended by generated tokens).

    ``sequences`` is what ``generate(**inputs)`` returned (or a prefix of it, at least the prompt);
    the attention mask grows by ones and Qwen's token types are recomputed.
    """
    info_ids, info_mask = ("decoder_input_ids", "decoder_attention_mask") if "decoder_input_ids" in inputs \
        else ("input_ids", "attention_mask")
    prompt = inputs[info_ids].shape[1]
    if sequences.shape[1] < prompt:
        raise ConfigError(f"sequences of length {sequences.shape[1]} are shorter than the prompt ({prompt})")
    out = dict(inputs)
    out[info_ids] = sequences
    grown = torch.ones(sequences.shape[0], sequences.shape[1] - prompt, dtype=inputs[info_mask].dtype)
    out[info_mask] = torch.cat([inputs[info_mask], grown], 1)
    layout = LAYOUTS[family_of_config(model.config)]
    if layout.token_types in out:
        # as generate() extends them: PaliGemma's generated tokens are the causal suffix (1)
        out[layout.token_types] = torch.cat([inputs[layout.token_types], grown], 1) if layout.prefix_types \
            else (sequences == IMAGE).long()
    return out
