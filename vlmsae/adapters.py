"""Model knowledge as data: where each supported family keeps its decoder layers and image tokens.

Adding a family is adding a row to ``FAMILIES``. Everything else in vlmsae asks
:func:`layers` about a model and never looks at its class.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from .errors import ConfigError, SiteError, UnsupportedModelError
from .sites import MLP_SITES, OUTPUT_SITES, SITES, hook_name, stream_of

Model = nn.Module
"""What every entry point's ``model`` is: a transformers VLM of a supported family (:func:`supported`),
or an nnsight ``NNsight`` wrapping one."""


class Kind(enum.IntEnum):
    """What a position in a stream holds (the decoder's, a vision tower's, a text tower's)."""

    PAD = 0
    SPECIAL = 1  # BOS, vision start/end, decoder start ...; a vision tower's class token
    IMAGE = 2  # an image token; in a vision tower, a patch
    TEXT = 3
    GENERATED = 4  # a token the model produced in generate(), fed back in under the KV cache


@dataclass(frozen=True)
class Tower:
    """A stack of layers besides the decoder, as data: a VLM's vision encoder, a dual encoder's vision or text tower."""

    paths: tuple[str, ...]
    """Attribute paths to the tower's module (its forward takes the images or the texts), tried in order."""
    layers: tuple[str, ...]
    """Attribute paths, relative to the tower, of its layer ``ModuleList``, tried in order (newest transformers
    first)."""
    config: str
    """Attribute of the top config holding the tower's config."""
    width: str = "hidden_size"
    """Attribute of the tower's config holding the width of its residual stream."""
    cls_token: bool = False
    """Position 0 of each image is a class token (CLIP-ViT, ViT), counted SPECIAL; the patches follow, row-major."""
    flat: bool = False
    """Qwen-VL's ViT: one ``(total patches, d)`` tensor for every image of the call (no batch dimension), each
    image's ``t * h * w`` patches in the image processor's order (``merge x merge`` blocks), ``grid_thw`` saying
    how many; vlmsae shows it as ``(images, patches, d)`` in that order."""
    window: bool = False
    """Qwen2.5-VL: the blocks run on the patches in window order (``get_vision_window_index``), restored only after
    the merger; vlmsae shows them in the processor's order all the same."""
    patch_mask: str | None = None
    """Forward keyword of a ``(images, rows, cols)`` bool mask of real patches (Idefics3 / SmolVLM): PAD elsewhere."""


@dataclass(frozen=True)
class Output:
    """A module whose output is a site without layers: a VLM's projector, a dual encoder's pooled embeddings."""

    site: str
    """One of ``vlmsae.sites.OUTPUT_SITES``."""
    paths: tuple[str, ...]
    """Attribute paths to the module, tried in order."""
    width: str = ""
    """Dotted path in the top config to its width; ``""``: the decoder's (a projector feeds the decoder)."""


@dataclass(frozen=True)
class Family:
    """One row of the adapter table."""

    name: str
    model_types: tuple[str, ...]
    """``config.model_type`` values of this family."""
    layer_paths: tuple[str, ...]
    """Attribute paths to the decoder layer ``ModuleList``, tried in order (newest transformers first)."""
    text_config: str
    """Attribute of the top config holding the decoder's config."""
    ids_key: str
    """Forward keyword that carries the decoder token ids."""
    mask_key: str
    """Forward keyword that carries the decoder attention mask."""
    image_token: str | None
    """Config attribute with the image placeholder id; ``None``: images never enter the decoder stream."""
    special_tokens: tuple[str, ...]
    """Config attributes (top or text config) whose ids count as special tokens."""
    hf_class: str
    """The transformers class that loads a checkpoint of this family."""
    control_tokens: tuple[str, ...] = ()
    """Token strings of the family's prompt format (chat template, image wrapping) that count as special when the
    tokenizer has them, whether or not the tokenizer itself marks them special (:func:`special_token_ids`)."""
    top_config_ids: bool = True
    """Whether the top config's token-id attributes are read too (``False``: only the text config's)."""
    patch_grid: str = "vision_config"
    """Where the image's patch grid comes from: ``"vision_config"`` (``image_size // patch_size`` per side, the
    merge from the image tokens per image) or ``"image_grid_thw"`` (the batch's, merged by ``spatial_merge_size``)."""
    vision: Tower | None = None
    """The vision encoder (sites ``vision.resid_pre`` / ``vision.resid_post``)."""
    text: Tower | None = None
    """A dual encoder's text tower (sites ``text.resid_pre`` / ``text.resid_post``)."""
    outputs: tuple[Output, ...] = ()
    """Sites at module outputs: the projector (``vision.proj_out``), pooled embeddings (``image_embeds``, ...)."""
    mlp_in: tuple[str, ...] = ("mlp",)
    """Attribute paths, relative to a decoder layer, of the module whose input is site ``mlp_in`` (the MLP's input,
    after the pre-MLP norm), tried in order."""
    mlp_out: tuple[str, ...] = ("mlp",)
    """Attribute paths, relative to a decoder layer, of the module whose output is site ``mlp_out`` (what the MLP adds
    to the residual), tried in order: Gemma 2 / 3 norm the MLP's output again (``post_feedforward_layernorm``)."""


def _vision(paths, layers=("encoder.layers",), **kw) -> Tower:
    return Tower(paths=paths, layers=layers, config="vision_config", **kw)


# transformers 5 flattened the vision models (CLIPVisionModel.encoder, ViTModel.layers); 4.x nested them
_CLIP_VIT = dict(layers=("encoder.layers", "vision_model.encoder.layers"), cls_token=True)
_SIGLIP = dict(layers=("encoder.layers", "vision_model.encoder.layers"))
_QWEN_VISION = dict(layers=("blocks",), flat=True)
_QWEN_MERGER = (Output("vision.proj_out", ("model.visual.merger", "visual.merger")),)
_PROJECTOR = (Output("vision.proj_out", ("model.multi_modal_projector", "multi_modal_projector")),)
_DUAL_SPECIAL = ("bos_token_id", "eos_token_id")

_QWEN_SPECIAL = ("bos_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id", "video_token_id")
_QWEN_PATHS = ("model.language_model.layers", "language_model.layers")
# Qwen's chat template and vision wrapping (tokenizer_config.json of Qwen2-VL / Qwen2.5-VL / Qwen3-VL).
_QWEN_CONTROL = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
_QWEN = dict(layer_paths=_QWEN_PATHS, text_config="text_config", ids_key="input_ids", mask_key="attention_mask",
             image_token="image_token_id", special_tokens=_QWEN_SPECIAL, control_tokens=_QWEN_CONTROL,
             patch_grid="image_grid_thw", outputs=_QWEN_MERGER)
# Idefics3 / SmolVLM: an image is <fake_token_around_image> <global-img> <image>... <fake_token_around_image>, and
# each crop of a split image <fake_token_around_image> <row_r_col_c> <image>...; turns end with <end_of_utterance>
# (processing_idefics3.py, processing_smolvlm.py). No config attribute names these: only the tokenizer knows them.
_IDEFICS3_CONTROL = ("<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>", "<image>",
                     *(f"<row_{r}_col_{c}>" for r in range(1, 9) for c in range(1, 9)))
_IDEFICS3 = dict(layer_paths=("model.text_model.layers",), text_config="text_config", ids_key="input_ids",
                 mask_key="attention_mask", image_token="image_token_id", special_tokens=("bos_token_id", "eos_token_id"),
                 control_tokens=_IDEFICS3_CONTROL,
                 vision=_vision(("model.vision_model", "vision_model"), patch_mask="patch_attention_mask"),
                 outputs=(Output("vision.proj_out", ("model.connector", "connector")),),
                 top_config_ids=False)  # its top-level pad_token_id is deprecated and not the decoder's (5.24)

FAMILIES = (
    Family(
        name="vit-gpt2", model_types=("vision-encoder-decoder",),
        layer_paths=("decoder.transformer.h",), text_config="decoder",
        ids_key="decoder_input_ids", mask_key="decoder_attention_mask",
        image_token=None,  # the image enters through cross-attention: every decoder position is text
        special_tokens=("decoder_start_token_id", "bos_token_id", "eos_token_id"),
        hf_class="VisionEncoderDecoderModel",
        vision=Tower(("encoder",), ("layers", "encoder.layer"), config="encoder", cls_token=True),
    ),
    Family(
        name="llava", model_types=("llava",),
        layer_paths=("model.language_model.layers", "language_model.model.layers", "language_model.layers"),
        text_config="text_config", ids_key="input_ids", mask_key="attention_mask",
        image_token="image_token_index", special_tokens=("bos_token_id", "eos_token_id"),
        hf_class="LlavaForConditionalGeneration",
        vision=_vision(("model.vision_tower", "vision_tower"), **_CLIP_VIT), outputs=_PROJECTOR,
    ),
    # Qwen2-VL's vision config names the ViT's width embed_dim (its hidden_size is the merger's output)
    Family(name="qwen2-vl", model_types=("qwen2_vl",), hf_class="Qwen2VLForConditionalGeneration",
           vision=_vision(("model.visual", "visual"), width="embed_dim", **_QWEN_VISION), **_QWEN),
    Family(name="qwen2.5-vl", model_types=("qwen2_5_vl",), hf_class="Qwen2_5_VLForConditionalGeneration",
           vision=_vision(("model.visual", "visual"), window=True, **_QWEN_VISION), **_QWEN),
    Family(name="qwen3-vl", model_types=("qwen3_vl",), hf_class="Qwen3VLForConditionalGeneration",
           vision=_vision(("model.visual", "visual"), **_QWEN_VISION), **_QWEN),
    Family(
        # <bos> ... <start_of_image> <image_soft_token>... <end_of_image> ... in <start_of_turn> / <end_of_turn> turns
        name="gemma3", model_types=("gemma3",), layer_paths=("model.language_model.layers",),
        mlp_out=("post_feedforward_layernorm",),  # Gemma3DecoderLayer: residual + post_feedforward_layernorm(mlp(...))
        text_config="text_config", ids_key="input_ids", mask_key="attention_mask", image_token="image_token_index",
        special_tokens=("bos_token_id", "eos_token_id", "boi_token_index", "eoi_token_index"),
        control_tokens=("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                        "<image_soft_token>"),
        hf_class="Gemma3ForConditionalGeneration",
        vision=_vision(("model.vision_tower", "vision_tower"), **_SIGLIP), outputs=_PROJECTOR,
    ),
    Family(
        # the prefix: <image>... <bos> prompt \n, attended bidirectionally; then the causal suffix
        name="paligemma", model_types=("paligemma",), layer_paths=("model.language_model.layers",),
        mlp_out=("post_feedforward_layernorm", "mlp"),  # PaliGemma 2's Gemma 2 decoder has one, PaliGemma 1's Gemma not
        text_config="text_config", ids_key="input_ids", mask_key="attention_mask", image_token="image_token_index",
        special_tokens=("bos_token_id", "eos_token_id"), hf_class="PaliGemmaForConditionalGeneration",
        vision=_vision(("model.vision_tower", "vision_tower"), **_SIGLIP), outputs=_PROJECTOR,
    ),
    Family(name="idefics3", model_types=("idefics3",), hf_class="Idefics3ForConditionalGeneration", **_IDEFICS3),
    Family(name="smolvlm", model_types=("smolvlm",), hf_class="SmolVLMForConditionalGeneration", **_IDEFICS3),
    # Dual encoders: no decoder; image_embeds / text_embeds are what get_image_features / get_text_features return
    # (CLIP: the projections of the pooled outputs; SigLIP: the towers' heads), before normalisation
    Family(
        name="clip", model_types=("clip",), layer_paths=(), text_config="text_config", ids_key="input_ids",
        mask_key="attention_mask", image_token=None, special_tokens=_DUAL_SPECIAL, hf_class="CLIPModel",
        vision=_vision(("vision_model",), **_CLIP_VIT),
        text=Tower(("text_model",), ("encoder.layers",), config="text_config"),
        outputs=(Output("image_embeds", ("visual_projection",), "projection_dim"),
                 Output("text_embeds", ("text_projection",), "projection_dim")),
    ),
    Family(
        name="siglip", model_types=("siglip",), layer_paths=(), text_config="text_config", ids_key="input_ids",
        mask_key="attention_mask", image_token=None, special_tokens=_DUAL_SPECIAL, hf_class="SiglipModel",
        vision=_vision(("vision_model",), **_SIGLIP),
        text=Tower(("text_model",), ("encoder.layers",), config="text_config"),
        outputs=(Output("image_embeds", ("vision_model.head",), "vision_config.hidden_size"),
                 Output("text_embeds", ("text_model.head",), "text_config.projection_size")),
    ),
)


def supported() -> str:
    """The supported families and their ``model_type`` values, for error messages."""
    return ", ".join(f"{f.name} (model_type {'/'.join(f.model_types)})" for f in FAMILIES)


class Stack(NamedTuple):
    """The modules behind one site: a stack's layers (indexed by layer), or the one module of a site without layers."""

    modules: Sequence[nn.Module]
    path: str
    """Attribute path of the layer list (of the module, for a site without layers) in the model."""
    width: int
    """Width of the tensor at the site."""
    within: str = ""
    """Attribute path, inside each layer, of the module hooked (``"mlp"`` for ``mlp_in``); ``""``: the layer itself."""


@dataclass(frozen=True, eq=False)
class ModelInfo:
    """What vlmsae knows about one model object: returned by :func:`layers`. Its repr leaves the modules out."""

    family: str
    model: nn.Module = field(repr=False)
    """The hookable ``nn.Module`` (unwrapped from nnsight if it was wrapped)."""
    layers: nn.ModuleList = field(repr=False)
    """The decoder layers, whose outputs are the residual stream (empty for a dual encoder)."""
    layer_path: str
    n_layers: int
    d_model: int
    """The decoder's width (0 for a dual encoder, which has none: :meth:`width` gives every site's)."""
    ids_key: str
    mask_key: str
    image_token_id: int | None
    """``None`` where images never enter the decoder stream (ViT-GPT2)."""
    special_ids: frozenset[int]
    """Ids counted as SPECIAL: those the config names (``Family.special_tokens``); a tokenizer adds more
    (:func:`special_token_ids`)."""
    pad_token_id: int | None
    control_tokens: tuple[str, ...] = field(default=(), repr=False)
    """The family's ``Family.control_tokens``."""
    patch_grid: str = "vision_config"
    """The family's ``Family.patch_grid``."""
    stacks: Mapping[str, Stack] = field(default_factory=dict, repr=False)
    """Every site of this model -> the modules behind it (``vlmsae.sites``)."""
    towers: Mapping[str, tuple[nn.Module, Tower]] = field(default_factory=dict, repr=False)
    """``"vision"`` / ``"text"`` -> the tower's module and its adapter row, for the towers this model has."""

    @property
    def has_image_tokens(self) -> bool:
        return self.image_token_id is not None

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites this model has: the decoder's, then its towers' and its outputs' (``vlmsae.sites.ALL_SITES``)."""
        return tuple(self.stacks)

    def stack(self, site: str) -> Stack:
        """The modules behind ``site``. Raises :class:`~vlmsae.errors.SiteError` for a site this model lacks."""
        if site not in self.stacks:
            raise SiteError(f"site={site!r} is not a site of this {self.family} model; its sites: {self.sites}")
        return self.stacks[site]

    def width(self, site: str = "resid_post") -> int:
        """Width of the tensor at ``site`` (``d_model`` at the decoder's). Raises ``SiteError`` as :meth:`stack`."""
        return self.stack(site).width

    def module_path(self, layer: int, site: str = "resid_post") -> str:
        """Attribute path of the module hooked for a site: ``model.language_model.layers.9``, ``model.connector``,
        ``model.language_model.layers.9.mlp``."""
        stack = self.stack(site)
        if site in OUTPUT_SITES:
            return stack.path
        return f"{stack.path}.{layer}.{stack.within}" if stack.within else f"{stack.path}.{layer}"

    def tower_config(self, stream: str = "vision"):
        """The config of a tower (``"vision"`` or ``"text"``). Raises ``SiteError`` when the model has none."""
        if stream not in self.towers:
            raise SiteError(f"this {self.family} model has no {stream} tower; its sites: {self.sites}")
        return _get(self.model.config, self.towers[stream][1].config)

    def site_kinds(self, site: str = "resid_post") -> frozenset[Kind]:
        """The token kinds the positions at ``site`` can hold, padding aside.

        The decoder's: special, text and generated, and image where images enter its stream; a vision tower's:
        patches (IMAGE) and its class token (SPECIAL); a text tower's: text and special; the projector's output and
        ``image_embeds``: IMAGE; ``text_embeds``: TEXT.
        """
        stream = stream_of(site)
        if stream == "decoder":
            kinds = {Kind.SPECIAL, Kind.TEXT, Kind.GENERATED} | ({Kind.IMAGE} if self.has_image_tokens else set())
        elif site in OUTPUT_SITES:
            kinds = {Kind.TEXT if stream == "text" else Kind.IMAGE}
        elif stream == "text":
            kinds = {Kind.SPECIAL, Kind.TEXT}
        else:
            kinds = {Kind.IMAGE} | ({Kind.SPECIAL} if self.towers[stream][1].cls_token else set())
        return frozenset(kinds)

    def hook_name(self, layer: int, site: str = "resid_post") -> str:
        """The TransformerLens-style name of a site, as SAELens stores it: ``blocks.9.hook_resid_post``,
        ``vision.blocks.3.hook_resid_post``, ``hook_image_embeds`` (:mod:`vlmsae.sites`)."""
        return hook_name(layer, site)

    def kinds(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              special_ids: frozenset[int] | None = None) -> torch.Tensor:
        """Token kind of every position, ``(batch, seq)`` int8 of :class:`Kind` values.

        ``attention_mask`` zeros are PAD; without a mask, ``pad_token_id`` positions are PAD.
        ``attention_mask`` may be longer than ``ids`` (generation): its last ``seq`` columns are used.
        """
        kinds = torch.full(ids.shape, Kind.TEXT, dtype=torch.int8, device=ids.device)
        special = self.special_ids | (special_ids or frozenset())
        if special:
            kinds[any_equal(ids, special)] = Kind.SPECIAL
        if self.image_token_id is not None:
            kinds[ids == self.image_token_id] = Kind.IMAGE
        if attention_mask is not None:
            kinds[attention_mask[:, -ids.shape[1]:].to(ids.device) == 0] = Kind.PAD
        elif self.pad_token_id is not None:
            kinds[ids == self.pad_token_id] = Kind.PAD
        return kinds


def any_equal(x: torch.Tensor, values) -> torch.Tensor:
    """``x == v`` for any ``v`` in ``values`` (a few Python ints), as a bool tensor.

    One comparison per value with the value as a kernel argument: unlike ``torch.isin`` with a
    fresh ``torch.tensor(values)``, nothing is copied host-to-device on every forward.
    """
    mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    for v in values:
        mask |= x == int(v)
    return mask


def unwrap(model: Model) -> nn.Module:
    """The ``nn.Module`` to hook: the model itself, or the one an nnsight ``NNsight`` wraps.

    Raises:
        UnsupportedModelError: a ``torch.compile`` wrapper (its graph does not run Python hooks), or an
            object that is neither a module nor an nnsight wrapper of one.
    """
    if isinstance(model, nn.Module):
        if hasattr(model, "_orig_mod"):
            raise UnsupportedModelError(
                f"{type(model).__name__} wraps {type(model._orig_mod).__name__} with torch.compile, whose graph "
                "does not see Python hooks; pass the uncompiled model (model._orig_mod) to vlmsae")
        return model
    inner = getattr(model, "_module", None)  # nnsight Envoy / NNsight keep the real module here
    if isinstance(inner, nn.Module):
        return unwrap(inner)
    raise UnsupportedModelError(f"{type(model).__name__} is not a torch nn.Module; supported families: {supported()}")


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _family(model: nn.Module) -> Family:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            if family.name == "vit-gpt2" and getattr(config.decoder, "model_type", None) != "gpt2":
                break
            return family
    raise UnsupportedModelError(
        f"{type(model).__name__} (config.model_type={model_type!r}) is not supported; supported families: "
        f"{supported()}")


def layers(model: Model) -> ModelInfo:
    """Adapter info of a supported VLM (or dual encoder): family, decoder layers, ``n_layers``, ``d_model``, token ids,
    and every site with the modules behind it (``info.sites``, ``info.stack(site)``).

    Raises:
        UnsupportedModelError: the model's ``config.model_type`` is not a supported family, or its
            decoder layers (a tower's, a projector) are not where the family keeps them.
    """
    module = unwrap(model)
    family = _family(module)
    found, path = nn.ModuleList(), ""  # a dual encoder has no decoder
    if family.layer_paths:
        found, path = _find(module, family.layer_paths, nn.ModuleList, family, "decoder layer")
    config = module.config
    text = getattr(config, family.text_config)

    def ids(attr):
        values = [getattr(c, attr, None) for c in ((config, text) if family.top_config_ids else (text,))]
        flat = []
        for v in values:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        return {int(v) for v in flat if v is not None}

    special = set().union(*(ids(a) for a in family.special_tokens))
    pad = ids("pad_token_id")
    image = getattr(config, family.image_token) if family.image_token else None
    d_model = int(text.hidden_size) if family.layer_paths else 0
    stacks = {site: Stack(found, path, d_model) for site in SITES} if family.layer_paths else {}
    for site, names in zip(MLP_SITES, (family.mlp_in, family.mlp_out)):
        # a layer list without the module (a wrapped or mixture-of-experts layer) has no MLP sites, only residual ones
        within = next((name for name in names if len(found)
                       and all(isinstance(_get(layer, name), nn.Module) for layer in found)), None)
        if within is not None:
            stacks[site] = Stack([_get(layer, within) for layer in found], path, d_model, within)
    towers = {}
    for stream, tower in (("vision", family.vision), ("text", family.text)):
        if tower is None:
            continue
        root, root_path = _find(module, tower.paths, nn.Module, family, f"{stream} tower")
        tower_layers, layers_path = _find(root, tower.layers, nn.ModuleList, family, f"{stream} tower layer")
        width = int(getattr(_get(config, tower.config), tower.width))
        towers[stream] = (root, tower)
        for site in SITES:
            stacks[f"{stream}.{site}"] = Stack(tower_layers, f"{root_path}.{layers_path}", width)
    for out in family.outputs:
        found_out, out_path = _find(module, out.paths, nn.Module, family, out.site)
        width = int(_get(config, out.width)) if out.width else d_model
        stacks[out.site] = Stack((found_out,), out_path, width)
    return ModelInfo(
        family=family.name, model=module, layers=found, layer_path=path, n_layers=len(found),
        d_model=d_model, ids_key=family.ids_key, mask_key=family.mask_key,
        image_token_id=None if image is None else int(image),
        special_ids=frozenset(special), pad_token_id=min(pad) if pad else None,
        control_tokens=family.control_tokens, patch_grid=family.patch_grid, stacks=stacks, towers=towers,
    )


def _find(module: nn.Module, paths: tuple[str, ...], cls: type, family: Family, what: str) -> tuple[nn.Module, str]:
    """The first of ``paths`` in ``module`` holding a ``cls``, and that path. Raises ``UnsupportedModelError``."""
    for path in paths:
        found = _get(module, path)
        if isinstance(found, cls):
            return found, path
    raise UnsupportedModelError(
        f"{type(module).__name__} is a {family.name} model but none of its known {what} paths {paths} holds "
        f"{'an nn.ModuleList' if cls is nn.ModuleList else 'a module'}; is this a base model without its "
        f"{what.removesuffix(' layer')}?")


def special_token_ids(model: Model, tokenizer=None) -> frozenset[int]:
    """The token ids that count as SPECIAL in ``model``'s stream: pass them as ``special_ids=`` to any entry point.

    Without a tokenizer: the ids the config names (BOS, EOS, begin / end of image, ...: ``Family.special_tokens``).
    With one (a tokenizer, or a processor holding it as ``.tokenizer``), also its ``all_special_ids``, every added
    token it marks special, and each of the family's ``Family.control_tokens`` (``<|im_start|>``,
    ``<start_of_turn>``, ``<fake_token_around_image>``, ...) that its vocabulary holds, special or not: chat
    templates' control tokens are not always marked special. Image placeholders stay IMAGE (they outrank SPECIAL).

    Raises:
        UnsupportedModelError: the model is not a supported family.
        ConfigError: ``tokenizer`` is neither a transformers tokenizer nor a processor holding one.
    """
    info = layers(model)
    ids = set(info.special_ids)
    if tokenizer is None:
        return frozenset(ids)
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if not hasattr(tok, "all_special_ids") or not hasattr(tok, "convert_tokens_to_ids"):
        raise ConfigError(f"tokenizer={type(tokenizer).__name__} is not a transformers tokenizer or a processor with "
                          "one (.tokenizer); pass AutoTokenizer.from_pretrained(...) or AutoProcessor.from_pretrained(...)")
    ids.update(int(i) for i in tok.all_special_ids)
    ids.update(int(i) for i, added in getattr(tok, "added_tokens_decoder", {}).items() if added.special)
    vocab = tok.get_vocab()
    ids.update(int(vocab[text]) for text in info.control_tokens if text in vocab)
    return frozenset(ids)


def load_model(name: str, *, device: str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a supported VLM with ``from_pretrained`` from a local folder (or a hub id when online), in eval mode.

    ``dtype`` ``None`` keeps the checkpoint's own. Raises:
        UnsupportedModelError: the config cannot be read (a hub id offline, a folder without
            ``config.json``), or its ``model_type`` is not a supported family.
    """
    import transformers
    from transformers import AutoConfig

    local = os.path.isdir(name)
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local)
    except OSError as err:
        raise UnsupportedModelError(
            f"cannot load {name!r}: {'its config is unreadable' if local else 'not a local folder, and the hub is out of reach'} "
            f"({str(err).splitlines()[0]}); download it where you have network (huggingface-cli download "
            f"{name} --local-dir DIR) and pass the folder") from None
    for family in FAMILIES:
        if config.model_type in family.model_types:
            cls = getattr(transformers, family.hf_class)
            model = cls.from_pretrained(name, local_files_only=local, dtype=dtype)
            return model.to(device).eval()
    raise UnsupportedModelError(f"{name!r} is a {config.model_type!r} model; supported families: {supported()}")
