"""Model knowledge as data: where each supported family keeps its decoder layers and image tokens.

Adding a family is adding a row to ``FAMILIES``. Everything else in vlmsae asks
:func:`layers` about a model and never looks at its class.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError
from .sites import hook_name

Model = nn.Module
"""What every entry point's ``model`` is: a transformers VLM of a supported family (:func:`supported`),
or an nnsight ``NNsight`` wrapping one."""


class Kind(enum.IntEnum):
    """What a position in the decoder stream holds."""

    PAD = 0
    SPECIAL = 1  # BOS, vision start/end, decoder start ...
    IMAGE = 2
    TEXT = 3
    GENERATED = 4  # a token the model produced in generate(), fed back in under the KV cache


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


_QWEN_SPECIAL = ("bos_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id", "video_token_id")
_QWEN_PATHS = ("model.language_model.layers", "language_model.layers")

FAMILIES = (
    Family(
        name="vit-gpt2", model_types=("vision-encoder-decoder",),
        layer_paths=("decoder.transformer.h",), text_config="decoder",
        ids_key="decoder_input_ids", mask_key="decoder_attention_mask",
        image_token=None,  # the image enters through cross-attention: every decoder position is text
        special_tokens=("decoder_start_token_id", "bos_token_id", "eos_token_id"),
        hf_class="VisionEncoderDecoderModel",
    ),
    Family(
        name="llava", model_types=("llava",),
        layer_paths=("model.language_model.layers", "language_model.model.layers", "language_model.layers"),
        text_config="text_config", ids_key="input_ids", mask_key="attention_mask",
        image_token="image_token_index", special_tokens=("bos_token_id", "eos_token_id"),
        hf_class="LlavaForConditionalGeneration",
    ),
    Family(
        name="qwen2-vl", model_types=("qwen2_vl",), layer_paths=_QWEN_PATHS, text_config="text_config",
        ids_key="input_ids", mask_key="attention_mask", image_token="image_token_id", special_tokens=_QWEN_SPECIAL,
        hf_class="Qwen2VLForConditionalGeneration",
    ),
    Family(
        name="qwen2.5-vl", model_types=("qwen2_5_vl",), layer_paths=_QWEN_PATHS, text_config="text_config",
        ids_key="input_ids", mask_key="attention_mask", image_token="image_token_id", special_tokens=_QWEN_SPECIAL,
        hf_class="Qwen2_5_VLForConditionalGeneration",
    ),
    Family(
        name="qwen3-vl", model_types=("qwen3_vl",), layer_paths=_QWEN_PATHS, text_config="text_config",
        ids_key="input_ids", mask_key="attention_mask", image_token="image_token_id", special_tokens=_QWEN_SPECIAL,
        hf_class="Qwen3VLForConditionalGeneration",
    ),
)


def supported() -> str:
    """The supported families and their ``model_type`` values, for error messages."""
    return ", ".join(f"{f.name} (model_type {'/'.join(f.model_types)})" for f in FAMILIES)


@dataclass(frozen=True, eq=False)
class ModelInfo:
    """What vlmsae knows about one model object: returned by :func:`layers`."""

    family: str
    model: nn.Module
    """The hookable ``nn.Module`` (unwrapped from nnsight if it was wrapped)."""
    layers: nn.ModuleList
    """The decoder layers, whose outputs are the residual stream."""
    layer_path: str
    n_layers: int
    d_model: int
    ids_key: str
    mask_key: str
    image_token_id: int | None
    """``None`` where images never enter the decoder stream (ViT-GPT2)."""
    special_ids: frozenset[int]
    pad_token_id: int | None

    @property
    def has_image_tokens(self) -> bool:
        return self.image_token_id is not None

    def hook_name(self, layer: int, site: str = "resid_post") -> str:
        """The TransformerLens-style name of a site, as SAELens stores it: ``blocks.9.hook_resid_post``."""
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
    """Adapter info of a supported VLM: family, decoder layers, ``n_layers``, ``d_model``, token ids.

    Raises:
        UnsupportedModelError: the model's ``config.model_type`` is not a supported family, or its
            decoder layers are not where the family keeps them.
    """
    module = unwrap(model)
    family = _family(module)
    for path in family.layer_paths:
        found = _get(module, path)
        if isinstance(found, nn.ModuleList):
            break
    else:
        raise UnsupportedModelError(
            f"{type(module).__name__} is a {family.name} model but none of its known decoder layer paths "
            f"{family.layer_paths} holds an nn.ModuleList; is this a base model without its decoder?")
    config = module.config
    text = getattr(config, family.text_config)

    def ids(attr):
        values = [getattr(c, attr, None) for c in (config, text)]
        flat = []
        for v in values:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        return {int(v) for v in flat if v is not None}

    special = set().union(*(ids(a) for a in family.special_tokens))
    pad = ids("pad_token_id")
    image = getattr(config, family.image_token) if family.image_token else None
    return ModelInfo(
        family=family.name, model=module, layers=found, layer_path=path, n_layers=len(found),
        d_model=int(text.hidden_size), ids_key=family.ids_key, mask_key=family.mask_key,
        image_token_id=None if image is None else int(image),
        special_ids=frozenset(special), pad_token_id=min(pad) if pad else None,
    )


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
