"""Data sources for training and evaluation: batches of model inputs.

Anything iterable over input dicts works (a list of batches you already have). ``ImageTextFolder``
reads a folder of images with a table of captions or questions (Parquet or JSON lines, read with
pandas) and turns each chunk into model inputs with ``to_inputs(images, texts)`` — the model's own
processor (``hf_processor``) or, for the tiny zoo models, ``vlmsae.zoo.processor``. Batches of the
Shapes testbed come from ``vlmsae.testbed.data.ShapesData``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from .adapters import layers as adapter_info
from .errors import ConfigError
from .hooks import check_sites, execution_device
from .record import record

TABLE_NAMES = ("captions.parquet", "captions.jsonl", "questions.parquet", "questions.jsonl")


def read_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=path.suffix == ".jsonl")
    raise ConfigError(f"table={str(path)!r} must be .parquet or .jsonl")


STALLED_FORWARDS = 20
"""Forwards in a row that add no row to a buffer with free rows before filling gives up (``ConfigError``)."""


class LiveSource:
    """Fills ring buffers by running ``model`` over ``data`` batches (re-iterated for more epochs).

    Before a run it says what the run needs to know of the model: ``d_model``, where each layer runs
    (:meth:`device_of`), whether the hook site exists (:meth:`check`) and where an SAE belongs
    (:meth:`describe`). ``site`` is any site of the model (a decoder's, a vision tower's, ``vision.proj_out``,
    ``image_embeds``): ``d_model`` is then its width. :meth:`start` positions it; then each :meth:`fill` runs one forward per batch,
    stopped after the deepest layer, writing every layer's buffer through its sink. Raises
    ``UnsupportedModelError`` for a model without an adapter, ``ConfigError`` when the data cannot be
    iterated again, or a batch with images holds no image token. ``special_ids`` are token ids counted as SPECIAL
    besides the config's (a chat template's control tokens: :func:`vlmsae.special_token_ids` with the tokenizer),
    which the buffers leave out unless their ``kinds`` ask for them.
    """

    def __init__(self, model, data: Iterable[dict], site: str, special_ids: Iterable[int] | None = None):
        self.info, self.data, self.site = adapter_info(model), data, site
        self.special_ids = frozenset(int(i) for i in (special_ids or ()))
        self.d_model = self.info.width(site)  # the site's width: d_model in the decoder, d_vision in a vision tower
        self.layers, self.it, self.used = [], iter(()), 0
        self.epochs = 0  # times the data ran out and was read again since start (a checkpoint's skip aside)

    def device_of(self, layer: int, device: str | None = None) -> torch.device:
        """Where a layer's buffer and SAEs live: ``device``, else where the layer runs (several devices
        under accelerate), else the CPU."""
        if device:
            return torch.device(device)
        return execution_device(self.info.stack(self.site).modules[layer]) or torch.device("cpu")

    def check(self, layers: list[int]) -> None:
        """Raises ``SiteError`` / ``LayerIndexError`` unless every layer has the hook site."""
        check_sites(self.info, [(L, self.site) for L in layers])

    def describe(self, meta: dict, layer: int) -> None:
        """Fill in the SAE metadata that says where it belongs (hook name, model, layer path) unless set."""
        info = self.info
        meta.setdefault("hook_name", info.hook_name(layer, self.site))
        meta.setdefault("model_class_name", type(info.model).__name__)
        meta.setdefault("model_name", getattr(info.model.config, "_name_or_path", "") or info.family)
        meta.setdefault("hf_layer_path", info.module_path(layer, self.site))

    def start(self, layers: list[int], position: dict) -> None:
        """Read for ``layers`` from the data's start, skipping the ``data_batches_used`` of a checkpoint's position."""
        self.layers, self.it, self.used = layers, iter(self.data), 0
        for _ in range(position.get("data_batches_used", 0)):
            self._next()
        self.epochs = 0

    def _next(self):
        try:
            batch = next(self.it)
        except StopIteration:
            self.it = iter(self.data)  # next epoch
            self.epochs += 1
            try:
                batch = next(self.it)
            except StopIteration:
                raise ConfigError(f"the data ran out after {self.used} batches and cannot be iterated again; "
                                  "pass a re-iterable source (a list, a folder source) or fewer steps") from None
        self.used += 1
        return batch

    @property
    def has_image_tokens(self) -> bool:
        """Whether the model's decoder stream holds image tokens (so a quota can ask for them)."""
        return self.info.has_image_tokens

    def fill(self, buffers: dict) -> None:
        """Forwards until every buffer ``{layer: RingBuffer}`` has no free rows (one host sync per forward).

        Raises ``ConfigError`` when ``STALLED_FORWARDS`` forwards in a row add no row to a buffer that still
        has free rows: its kinds or quota ask for tokens this data does not have (e.g. image rows from a
        model without image tokens), and filling would never end.
        """
        free, stalled = None, 0
        while any(now := [b.free_rows() for b in buffers.values()]):  # one sync per forward
            stalled = stalled + 1 if now == free else 0
            if stalled >= STALLED_FORWARDS:
                L = next(L for L, n in zip(buffers, now) if n)
                kinds = [[k.name.lower() for k in seg.kinds] for seg in buffers[L].segments
                         if seg.free.numel() > int(seg.filled)]
                raise ConfigError(f"{STALLED_FORWARDS} forwards added no row to layer {L}'s buffer, which still has "
                                  f"{now[list(buffers).index(L)]} free rows for kinds {kinds}: the data brings none; "
                                  "admit other kinds (kinds=, quota=) or use data that has them")
            free = now
            self.forward(lambda L, resid, fwd: buffers[L].write(resid, fwd))

    def forward(self, sink) -> None:
        """One forward over the next batch, stopped after the deepest layer, handing each layer's residual
        ``(batch, seq, d_model)`` to ``sink(layer, resid, fwd)``."""
        batch = self._next()
        self._check(batch)
        with torch.no_grad(), record(self.info.model, self.layers, site=self.site, stop=True, sink=sink,
                                     special_ids=self.special_ids):
            self.info.model(**batch)

    def _check(self, batch: dict) -> None:
        """A batch with images but no image placeholders would fail deep in the model: say why here."""
        info, ids = self.info, batch.get(self.info.ids_key)
        if info.has_image_tokens and "pixel_values" in batch and ids is not None \
                and not bool((ids == info.image_token_id).any()):
            raise ConfigError(f"data batch {self.used} has pixel_values but no image token (id {info.image_token_id}) "
                              f"in {info.ids_key}; a {info.family} model needs one placeholder per image patch: "
                              "build inputs with the model's processor")

    def state(self) -> dict:
        return {"data_batches_used": self.used}


class ImageTextFolder:
    """Batches of model inputs from ``folder``: images named in a table's ``image`` column, texts in ``text``.

    The table is ``table`` or the first of ``captions.parquet``, ``captions.jsonl``,
    ``questions.parquet``, ``questions.jsonl`` in the folder. Iterating again starts over (epochs).
    """

    def __init__(self, folder: str | os.PathLike, to_inputs: Callable[[list, list[str]], dict], *,
                 batch_size: int = 8, table: str | os.PathLike | None = None, image_column: str = "image",
                 text_column: str = "text"):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"folder={str(folder)!r} is not a folder of images")
        if table is None:
            found = [self.folder / n for n in TABLE_NAMES if (self.folder / n).exists()]
            if not found:
                raise ConfigError(f"{self.folder} holds none of {TABLE_NAMES}; write one with columns "
                                  f"{image_column!r} (file name) and {text_column!r}, or pass table=")
            table = found[0]
        self.table = read_table(Path(table))
        missing = [c for c in (image_column, text_column) if c not in self.table.columns]
        if missing:
            raise ConfigError(f"table {table} lacks columns {missing}; it has {list(self.table.columns)}")
        absent = [n for n in self.table[image_column] if not (self.folder / n).exists()]
        if absent:
            raise ConfigError(f"{len(absent)} images named in {table} are not in {self.folder}, e.g. {absent[0]!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1")
        self.to_inputs, self.batch_size = to_inputs, batch_size
        self.image_column, self.text_column = image_column, text_column

    def __len__(self) -> int:
        return -(-len(self.table) // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self.table), self.batch_size):
            rows = self.table.iloc[start:start + self.batch_size]
            images = [Image.open(self.folder / name).convert("RGB") for name in rows[self.image_column]]
            yield self.to_inputs(images, [str(t) for t in rows[self.text_column]])


def hf_processor(model, processor=None) -> Callable[[list, list[str]], dict]:
    """``(images, texts) -> inputs`` with the model's own Hugging Face processor (loaded from its folder).

    Decoder-only VLMs get each text after one image placeholder, through the processor's chat
    template when it has one; a ViT-GPT2 captioner gets ``pixel_values`` and the text as
    ``decoder_input_ids``. The returned function's ``tokenizer`` attribute is the tokenizer it uses (``None`` for a
    captioner folder without one): pass it to :func:`vlmsae.special_token_ids` so that the chat template's control
    tokens count as SPECIAL.
    """
    info = adapter_info(model)
    name = getattr(info.model.config, "_name_or_path", "")
    if info.family == "vit-gpt2":
        # A captioner folder holds an image processor and a tokenizer but no joint processor; AutoProcessor
        # would hand back the tokenizer alone.
        if processor is None:
            from transformers import AutoImageProcessor, AutoTokenizer

            image_processor = _from_folder(AutoImageProcessor, name)
            tokenizer = _from_folder(AutoTokenizer, name, required=False)
        else:
            tokenizer = getattr(processor, "tokenizer", None)
            image_processor = getattr(processor, "image_processor", processor)

        def captioner(images, texts):
            pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
            if tokenizer is None:
                return {"pixel_values": pixels}
            text = tokenizer([tokenizer.bos_token + t for t in texts], return_tensors="pt", padding=True)
            return {"pixel_values": pixels, "decoder_input_ids": text["input_ids"],
                    "decoder_attention_mask": text["attention_mask"]}

        captioner.tokenizer = tokenizer
        return captioner

    if processor is None:
        from transformers import AutoProcessor

        processor = _from_folder(AutoProcessor, name)

    def vlm(images, texts):
        if getattr(processor, "chat_template", None):
            prompts = [processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
                add_generation_prompt=True) for t in texts]
        else:
            prompts = [f"{processor.image_token}\n{t}" for t in texts]
        return dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))

    vlm.tokenizer = getattr(processor, "tokenizer", None)
    return vlm


def _from_folder(auto, name: str, required: bool = True):
    try:
        return auto.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        if not required:
            return None
        raise ConfigError(f"no {auto.__name__.removeprefix('Auto')} found for {name!r} offline "
                          f"({str(err).splitlines()[0]}); save one into that folder or pass processor=, or for "
                          "the tiny zoo models use vlmsae.zoo.processor(model)") from None


def __getattr__(name: str):
    # ShapesData moved to the testbed (vlmsae.testbed.data); the old path works, with a warning, for one release.
    if name == "ShapesData":
        import warnings

        from .testbed.data import ShapesData

        warnings.warn("vlmsae.data.ShapesData moved to vlmsae.testbed.data.ShapesData; import it from there "
                      "(the old path goes in the next release)", DeprecationWarning, stacklevel=2)
        return ShapesData
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
