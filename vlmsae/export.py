"""Export a scan's latents, top examples and labels to Neuronpedia, where text SAEs are browsed.

Two layouts, both read from Neuronpedia's and SAEDashboard's own sources (``hijohnnylin/neuronpedia`` at
commit ``ebb8426f``, ``jbloomAus/SAEDashboard`` at ``db4839a4``), not from memory:

- ``layout="upload"`` (default): the body of Neuronpedia's ``POST /api/feature/upload-batch``, which any source
  set's creator may send (its schema: ``apps/webapp/app/api/feature/upload-batch/route.tsx``; the Python client
  ``webapp-python-client/neuronpedia/requests/feature_request.py`` sends the same keys). ``modelId``,
  ``source`` (``"{layer}-{source_set}"``) and ``features``, at most 128 per request; each feature has ``index``,
  ``density``, ``topLogits`` / ``bottomLogits`` (``null`` here: a scan holds no logits), ``explanations``
  (``{"text", "methodName", "modelName"}``: the labels) and at least one activation ``{"tokens", "values",
  "quantileMax", "quantileMin", "quantileFraction"}`` with 1 to 1024 tokens. Neuronpedia derives each
  activation's ``maxValue``, ``maxValueTokenIndex`` and ``minValue``, and the feature's ``maxActApprox``, from
  ``values``; the quantile fields are left ``null`` (a scan keeps top examples, not quantiles).
- ``layout="saedashboard"``: a ``batch-N.json`` as SAEDashboard's Neuronpedia runner writes it
  (``sae_dashboard/neuronpedia/neuronpedia_dashboard.py``), which Neuronpedia's
  ``utils/neuronpedia-utils/neuronpedia_utils/convert-saedashboard-to-neuronpedia-export.py`` turns into an
  import. ``model_id``, ``layer``, ``sae_set``, ``sae_id_suffix`` and ``features``; each feature has
  ``feature_index``, ``frac_nonzero`` (density), the logit, histogram, alignment and correlation lists that
  converter reads (empty here), and activations ``{"bin_min": -1, "bin_max": <the latent's top value>,
  "bin_contains": -1, "tokens", "values", "qualifying_token_index"}`` (SAEDashboard's marks of its top-activations
  group). That layout has no field for explanations: labels need ``layout="upload"``.

Image patches are positions. For a top example with image tokens, the activation's tokens are first one
position per image token, row-major over the image, named ``"<img r{row}c{col}>"`` (``row``, ``col`` count
image tokens: a token that merges ``m x m`` patches, as in Qwen-VL, is one position, so on the merged grid),
valued at the latent's activation there (:meth:`vlmsae.analysis.TopExamples.heatmap`); then the tokens of the
scan's context window around the peak (``2 * context + 1``, less what fell outside the sequence), as in the
dashboard. At a vision-tower site the patches are all there is. A value above the example's peak can only be at a
position the scan did not read (``where``: BOS and other special tokens by default) and is exported as 0, so that
Neuronpedia's ``maxValue`` is the scan's top value (its converter zeroes BOS likewise). Strings are JSON-escaped (the files are ASCII);
NUL characters, which Neuronpedia's database cannot store, become spaces.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from .analysis import Scan, latent_table
from .checks import check_labels
from .errors import ConfigError
from .files import write_folder_atomic, write_text_atomic

LAYOUTS = ("upload", "saedashboard")
MAX_FEATURES = 128
"""Features per upload-batch request (Neuronpedia's limit)."""
MAX_TOKENS = 1024
"""Tokens per activation in an upload-batch request (Neuronpedia's limit)."""
MAX_LABEL = 512
"""Characters per explanation in an upload-batch request (Neuronpedia's limit)."""

_SAEDASHBOARD_LISTS = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                       "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                       "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
                       "neg_str", "neg_values", "pos_str", "pos_values", "freq_hist_data_bar_values",
                       "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values")


def _text(s) -> str:
    return str(s).replace("\x00", " ")


def _name(value, what: str) -> str:
    if not isinstance(value, str) or not value or re.search(r"\s|/", value):
        raise ConfigError(f"{what}={value!r} must be a non-empty name without spaces or '/' "
                          "(Neuronpedia puts it in URLs), e.g. 'llava-1.5-7b' or 'vlmsae-res'")
    return value


def _tokens(tokenizer, ids: list[int]) -> list[str]:
    words = [str(i) for i in ids] if tokenizer is None else [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    return [_text(w) or f"<{i}>" for w, i in zip(words, ids)]  # Neuronpedia rejects an empty token


def _examples(scan: Scan, latent: int, tokenizer) -> list[tuple[list[str], list[float], int, float]]:
    """``(tokens, values, index of the peak, peak value)`` of each top example of ``latent`` where it fires."""
    top = scan.top
    row = top.row(latent)
    heats = top.heatmap(row)
    merge = top.layout.merge if top.layout is not None else 1
    out = []
    for j in range(top.values.shape[1]):
        value = float(top.values[row, j])
        if int(top.example[row, j]) < 0 or not value > 0:
            continue
        tokens, values = [], []
        if heats is not None:
            grid = heats[j][::merge, ::merge].tolist()  # one value per image token
            for r, line in enumerate(grid):
                for c, v in enumerate(line):
                    tokens.append(f"<img r{r}c{c}>")
                    values.append(float(v))
        ids, acts = top.tokens[row, j].tolist(), top.token_acts[row, j].tolist()
        middle = len(ids) // 2
        kept = [i for i, t in enumerate(ids) if t >= 0]
        peak = len(tokens) + kept.index(middle) if middle in kept else values.index(max(values))
        tokens += _tokens(tokenizer, [ids[i] for i in kept])
        values += [float(acts[i]) for i in kept]
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f"latent {latent}: non-finite activations in example {int(top.example[row, j])}; "
                              "the SAE or model produced NaN/Inf (check vlmsae.evaluate on this data)")
        # above the peak (the largest value at a position the scan read) is a position it did not read, such as
        # BOS, an attention sink: 0, so that the activation peaks where the scan's example does
        values = [v if v <= value else 0.0 for v in values]
        out.append((tokens, values, peak, value))
    return out


def neuronpedia_json(scan: Scan, *, model_id: str, layer: int, source_set: str = "vlmsae-res",
                     layout: str = "upload", table: pd.DataFrame | None = None, tokenizer=None, labels=None,
                     latents: Iterable[int] | None = None, dataset: str = "") -> dict:
    """One batch of the scan's latents in Neuronpedia's import layout (module docstring): a JSON-ready dict.

    ``model_id``: the model's id on Neuronpedia; ``layer`` and ``source_set`` name the source
    (``"{layer}-{source_set}"``, Neuronpedia's convention: ``"12-vlmsae-res"``). ``table`` defaults to
    ``latent_table(scan)`` (its ``density`` is exported); ``tokenizer`` decodes the context tokens (else token ids
    as text); ``labels``: a mapping latent -> label, or a DataFrame with a ``label`` column indexed by latent,
    exported as each latent's explanation (``layout="upload"``). ``latents`` defaults to every scanned latent with
    an example where it fires (Neuronpedia needs one); ``dataset`` names the data (``layout="saedashboard"``).
    :func:`write_neuronpedia` splits the features into batches of at most 128.

    Raises:
        ConfigError: an unknown ``layout``, a bad ``model_id`` / ``source_set`` / ``layer``, a latent that was not
            scanned, is repeated or never fired, labels for latents not scanned or longer than 512 characters,
            labels with ``layout="saedashboard"``, an example of more than 1024 positions (upload), non-finite
            activations, or nothing to export.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} is unknown; use one of {LAYOUTS}")
    _name(model_id, "model_id")
    _name(source_set, "source_set")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ConfigError(f"layer={layer!r} must be an integer >= 0 (Neuronpedia names sources '<layer>-<set>')")
    scanned = scan.top.latents.tolist()
    names = check_labels(labels, scanned)
    if names and layout == "saedashboard":
        raise ConfigError("SAEDashboard's batch layout has no field for explanations; pass layout='upload' to "
                          "export labels, or leave labels out")
    long = {k: len(v) for k, v in names.items() if len(v) > MAX_LABEL}
    if long:
        raise ConfigError(f"labels of latents {sorted(long)[:10]} are longer than {MAX_LABEL} characters "
                          f"({max(long.values())}); Neuronpedia takes at most {MAX_LABEL}: shorten them")
    table = latent_table(scan, tokenizer=tokenizer) if table is None else table
    chosen = scanned if latents is None else list(latents)
    if latents is not None and len(set(chosen)) != len(chosen):
        twice = sorted({i for i in chosen if chosen.count(i) > 1})
        raise ConfigError(f"latents {twice[:10]} are given more than once; Neuronpedia needs each index once")
    features = []
    for latent in chosen:
        examples = _examples(scan, latent, tokenizer)  # ConfigError for a latent not scanned
        if not examples:
            if latents is None:
                continue
            raise ConfigError(f"latent {latent} has no example where it fires in this scan; Neuronpedia needs at "
                              "least one activation per feature: leave it out of latents=")
        density = float(table.at[latent, "density"])
        top_value = max(v for *_, v in examples)
        if layout == "upload":
            long = [len(t) for t, *_ in examples if len(t) > MAX_TOKENS]
            if long:
                raise ConfigError(f"latent {latent}: an example of {long[0]} positions (image tokens + context); "
                                  f"Neuronpedia takes at most {MAX_TOKENS}: use smaller images or a smaller context")
            features.append({
                "index": int(latent), "density": density, "topLogits": None, "bottomLogits": None,
                "explanations": [{"text": _text(names[latent]), "methodName": None, "modelName": None}]
                if latent in names else [],
                "activations": [{"tokens": t, "values": v, "quantileMax": None, "quantileMin": None,
                                 "quantileFraction": None} for t, v, *_ in examples],
            })
        else:
            feature = {"feature_index": int(latent), **{k: [] for k in _SAEDASHBOARD_LISTS},
                       "frac_nonzero": density, "n_prompts_total": 0, "n_tokens_in_prompt": 0,
                       "dataset": _text(dataset), "decoder_weights_dist": []}
            feature["activations"] = [{"bin_min": -1, "bin_max": top_value, "bin_contains": -1, "tokens": t,
                                       "values": v, "qualifying_token_index": peak} for t, v, peak, _ in examples]
            features.append(feature)
    if not features:
        raise ConfigError("no scanned latent fired on the scanned data: nothing to export (scan more data, or "
                          "check the SAE with vlmsae.evaluate)")
    if layout == "upload":
        return {"modelId": model_id, "source": f"{layer}-{source_set}", "features": features}
    return {"model_id": model_id, "layer": layer, "sae_set": source_set, "sae_id_suffix": None, "features": features}


def _dumps(data: dict) -> str:
    return json.dumps(data, allow_nan=False, ensure_ascii=True)


def write_neuronpedia(path: str | os.PathLike, scan: Scan, *, batch_size: int = MAX_FEATURES, **kwargs) -> Path:
    """Write :func:`neuronpedia_json` (same keywords) to ``path`` atomically and return the path.

    A ``path`` ending in ``.json`` gets one file (one upload request: at most 128 features); any other ``path``
    is a folder of ``batch-0.json``, ``batch-1.json``, ... of at most ``batch_size`` features each, the files
    SAEDashboard writes and Neuronpedia's converter reads (with ``layout="upload"``, one request body each). A
    folder already at ``path`` is replaced only if it holds nothing but such batch files. Nothing is written
    until the whole export is built; missing parent folders are created, and removed again if the write fails.

    Raises:
        ConfigError: as :func:`neuronpedia_json`; a bad ``batch_size`` (upload: 1..128); a ``.json`` file for
            more than 128 features (upload); ``path`` is a folder where a file is asked for, or a folder that
            holds other files; a parent of ``path`` is a file.
        OSError: the file system refuses the write (then nothing is left behind).
    """
    layout = kwargs.get("layout", "upload")
    limit = MAX_FEATURES if layout == "upload" else None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 or \
            (limit and batch_size > limit):
        raise ConfigError(f"batch_size={batch_size!r} must be an integer in 1..{limit or 'any'} "
                          "(features per batch file)")
    path = Path(path)
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a folder; "
                              "choose another path")
    data = neuronpedia_json(scan, **kwargs)
    features = data.pop("features")
    one_file = path.suffix.lower() == ".json"
    if one_file:
        if path.is_dir():
            raise ConfigError(f"{str(path)!r} is a folder; give a file name ending in .json, or a folder path "
                              "without .json for batch files")
        if limit and len(features) > limit:
            raise ConfigError(f"{len(features)} features do not fit one upload request (at most {limit}); "
                              "give a folder path (no .json) to write batch files, or pass latents=")
    elif path.exists():
        others = [p.name for p in path.iterdir() if not re.fullmatch(r"batch-\d+\.json", p.name)] \
            if path.is_dir() else [path.name]
        if others:
            raise ConfigError(f"{str(path)!r} holds {others[:5]}, not only batch files; write to a new or "
                              "empty folder")
    texts = [_dumps({**data, "features": features[i:i + batch_size]}) for i in range(0, len(features), batch_size)]
    created = [p for p in reversed(path.parents) if not p.exists()]
    try:
        for folder in created:
            folder.mkdir()
        if one_file:
            write_text_atomic(path, _dumps({**data, "features": features}))
        else:
            def write(tmp: Path) -> None:
                for i, text in enumerate(texts):
                    (tmp / f"batch-{i}.json").write_text(text, encoding="ascii")
            write_folder_atomic(path, write)
    except BaseException:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    return path
