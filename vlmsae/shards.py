"""Activations on disk: ``harvest`` writes them as safetensors shards, ``Shards`` feeds them to ``train``.

Training from shards is the same trainer with another source: instead of running the model, each
fill of a ring buffer reads the next rows of that layer's shards. The rows are filtered exactly as
the live buffer filters them (no padding, admitted kinds, outliers left out) before they are written.
NaN or Inf in a harvested residual stops the harvest (checked before any filter, which would hide
an Inf row as an outlier); training stops on any that a shard holds.

Layout of a shard folder::

    manifest.json             layers, d_model, dtype, rows per shard, where they came from
    L{layer}-{index:05d}.safetensors   acts (n, d_model), kind, position, token, sample
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .adapters import FAMILIES, Kind, layers as adapter_info
from .buffer import Rows, outliers, parse_kinds, tag_rows
from .errors import ConfigError, NonFiniteError, SAEFileError
from .files import write_atomic, write_text_atomic
from .hooks import check_sites
from .record import record


@torch.no_grad()
def harvest(model, layers: int | Iterable[int], data: Iterable[dict], out: str | os.PathLike, *,
            site: str = "resid_post", kinds=("image", "text", "generated"), outlier_factor: float | None = 10.0,
            shard_rows: int = 65536, dtype: torch.dtype = torch.float32, special_ids: Iterable[int] | None = None,
            ) -> Path:
    """Run ``data`` through the model once and write the residuals of ``layers`` as shards under ``out``.

    Each shard ``L{layer}-{i:05d}.safetensors`` holds up to ``shard_rows`` admitted rows: ``acts``
    ``(rows, d_model)`` in ``dtype`` and each row's kind, position, token and sample; ``vlmsae.Shards(out)``
    reads them back for training. ``special_ids`` are token ids counted as SPECIAL besides the config's (a chat
    template's control tokens: :func:`vlmsae.special_token_ids` with the tokenizer), left out unless ``kinds`` asks.
    Returns ``out``.

    Raises:
        LayerIndexError, SiteError, UnsupportedModelError: as :func:`vlmsae.record`.
        ConfigError: an unknown token kind in ``kinds``.
        NonFiniteError: a residual holds NaN or Inf (nothing more is written).
    """
    info = adapter_info(model)
    layers = [layers] if isinstance(layers, int) else sorted(layers)
    check_sites(info, [(L, site) for L in layers])
    admitted = torch.tensor([int(k) for k in parse_kinds(kinds, "kinds")], dtype=torch.int8)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pending = {L: [] for L in layers}
    counts = {L: [] for L in layers}
    samples, batch_index = 0, 0

    def flush(L, final=False):
        rows = Rows(*(torch.cat(parts) for parts in zip(*pending[L]))) if pending[L] else None
        while rows is not None and (rows.acts.shape[0] >= shard_rows or (final and rows.acts.shape[0])):
            head = Rows(*(t[:shard_rows].contiguous() for t in rows))
            write_atomic(out / f"L{L}-{len(counts[L]):05d}.safetensors",
                         lambda tmp: save_file(dict(zip(Rows._fields, head)), tmp))
            counts[L].append(head.acts.shape[0])
            rows = Rows(*(t[shard_rows:] for t in rows))
        pending[L] = [rows] if rows is not None and rows.acts.shape[0] else []

    def sink(L, resid, fwd):
        rows = tag_rows(resid, fwd, samples, "cpu")
        if not torch.isfinite(rows.acts[rows.kind != Kind.PAD]).all():  # before any filter: rows are on the host
            raise NonFiniteError(f"NaN or Inf in the activations of layer {L} in data batch {batch_index} (samples "
                                 f"{samples}..{samples + resid.shape[0] - 1}); the harvest into {out} stopped there, "
                                 "unfinished. Check the model's dtype (fp16 overflows) or the inputs, then harvest again")
        keep = torch.isin(rows.kind, admitted)
        if outlier_factor is not None:
            keep &= ~outliers(rows.acts, rows.kind != Kind.PAD, outlier_factor)
        pending[L].append(Rows(rows.acts[keep].to(dtype), *(t[keep] for t in rows[1:])))
        if sum(p.acts.shape[0] for p in pending[L]) >= shard_rows:
            flush(L)

    for batch in tqdm(data, desc="harvest"):
        with record(info.model, layers, site=site, stop=True, sink=sink, special_ids=special_ids):
            info.model(**batch)
        samples += next(iter(batch.values())).shape[0]
        batch_index += 1
    for L in layers:
        flush(L, final=True)
    manifest = {"layers": layers, "d_model": info.width(site), "site": site, "dtype": str(dtype).removeprefix("torch."),
                "shards": {str(L): counts[L] for L in layers}, "family": info.family,
                "model_class_name": type(info.model).__name__,
                "hook_names": {str(L): info.hook_name(L, site) for L in layers}}
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    return out


class Shards:
    """A harvested shard folder, read as a stream of row chunks per layer (cycling at the end)."""

    def __init__(self, folder: str | os.PathLike, chunk_rows: int = 4096):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        try:
            self.manifest = json.loads(path.read_text())
            self.layers = [int(L) for L in self.manifest["layers"]]
            self.d_model = int(self.manifest["d_model"])
            self.site = self.manifest["site"]
        except FileNotFoundError:
            raise SAEFileError(f"{path} is missing: {self.folder} is not a shard folder written by vlmsae.harvest") \
                from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise SAEFileError(f"{path}: unreadable manifest ({err}); harvest again") from None
        self.chunk_rows = chunk_rows

    def stream(self, layer: int, skip_rows: int = 0) -> Iterator[Rows]:
        """Row chunks of one layer, shard after shard, cycling; ``skip_rows`` rows are passed over first."""
        if layer not in self.layers:
            raise ConfigError(f"layer={layer} was not harvested; {self.folder} holds layers {self.layers}")
        counts = self.manifest["shards"][str(layer)]
        if not counts:
            raise ConfigError(f"{self.folder} holds no rows of layer {layer}; harvest more data")
        while True:
            for index, _ in enumerate(counts):
                path = self.folder / f"L{layer}-{index:05d}.safetensors"
                try:
                    shard = load_file(str(path))
                    rows = Rows(*(shard[name] for name in Rows._fields))
                except (OSError, SafetensorError, KeyError) as err:
                    raise SAEFileError(f"{path}: unreadable shard ({err}); harvest again") from None
                for start in range(0, rows.acts.shape[0], self.chunk_rows):
                    chunk = Rows(*(t[start:start + self.chunk_rows] for t in rows))
                    if skip_rows >= chunk.acts.shape[0]:
                        skip_rows -= chunk.acts.shape[0]
                        continue
                    if skip_rows:
                        chunk = Rows(*(t[skip_rows:] for t in chunk))
                        skip_rows = 0
                    yield chunk


class ShardSource:
    """Fills ring buffers from harvested shards, each layer from its own stream.

    The same interface as :class:`vlmsae.data.LiveSource`: ``d_model``, :meth:`device_of`,
    :meth:`check`, :meth:`describe`, :meth:`start` (skipping the ``shard_rows_used`` of a checkpoint's
    position) and :meth:`fill`. Raises ``ConfigError`` when the shards hold another site than ``site``
    or lack a layer, ``SAEFileError`` for an unreadable shard.
    """

    epochs = 0
    """Times the data was read again (LiveSource's count): shards are read once, never again."""

    def __init__(self, shards: Shards, site: str):
        if shards.site != site:
            raise ConfigError(f"the shards hold site {shards.site!r} but site={site!r}; pass site={shards.site!r}")
        self.shards, self.site, self.d_model = shards, site, shards.d_model
        self.rows_used, self.streams = {}, {}

    @property
    def has_image_tokens(self) -> bool:
        """Whether the harvested family's decoder stream holds image tokens (its adapter row names an image token)."""
        family = self.shards.manifest.get("family")
        return not any(f.name == family and f.image_token is None for f in FAMILIES)

    def device_of(self, layer: int, device: str | None = None) -> torch.device:
        """Where a layer's buffer and SAEs live: ``device``, else the CPU."""
        return torch.device(device or "cpu")

    def check(self, layers: list[int]) -> None:
        """Raises ``ConfigError`` unless every layer was harvested."""
        for layer in layers:
            if layer not in self.shards.layers:
                raise ConfigError(f"layer={layer} was not harvested; {self.shards.folder} holds layers "
                                  f"{self.shards.layers}")

    def describe(self, meta: dict, layer: int) -> None:
        """Fill in the SAE metadata that says where it belongs (hook name, model), from the manifest, unless set."""
        manifest = self.shards.manifest
        hook_name = manifest.get("hook_names", {}).get(str(layer))
        meta.setdefault("hook_name", hook_name or f"blocks.{layer}.hook_{self.site}")
        meta.setdefault("model_class_name", manifest.get("model_class_name", ""))
        meta.setdefault("model_name", manifest.get("family", ""))

    def start(self, layers: list[int], position: dict) -> None:
        """Stream ``layers`` from their first rows, skipping the ``shard_rows_used`` of a checkpoint's position."""
        rows_used = position.get("shard_rows_used") or {}
        self.rows_used = {L: int(rows_used.get(str(L), 0)) for L in layers}
        self.streams = {L: self.shards.stream(L, skip_rows=self.rows_used[L]) for L in layers}

    def fill(self, buffers: dict) -> None:
        """Reads rows until every buffer ``{layer: RingBuffer}`` has no free rows."""
        for L, buffer in buffers.items():
            while buffer.free_rows():
                chunk = next(self.streams[L])
                buffer.write_rows(chunk)
                self.rows_used[L] += chunk.acts.shape[0]

    def state(self) -> dict:
        return {"shard_rows_used": {str(L): n for L, n in self.rows_used.items()}}
