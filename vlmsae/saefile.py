"""SAE folders on disk: the SAELens v6 layout (read and written) and EleutherAI sparsify's (read).

SAELens folder:  cfg.json + sae_weights.safetensors
    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] (+ threshold [d_sae] for jumprelu)
    a transcoder's: W_dec [d_sae, d_out], b_dec [d_out], and "d_out" in cfg.json (SAELens' Transcoder classes)
sparsify folder: cfg.json + sae.safetensors
    encoder.weight [d_sae, d_in], encoder.bias [d_sae], W_dec [d_sae, d_in], b_dec [d_in]

vlmsae writes the SAELens layout so that `sae_lens.SAE.load_from_disk` opens
it; what SAELens has no key for (architecture, loss recipe, input scale) goes into a
top-level "vlmsae" section that SAELens ignores. The input scale is folded
into the saved weights (SAELens' `normalize_activations: "none"` then holds);
being a power of two, folding and unfolding are exact. BatchTopK is saved as
SAELens saves it: a JumpReLU with one shared threshold. An MGSAE (`vlmsae.mgsae`) is
saved in the same layout with architecture "mgsae", which only vlmsae opens: its
b_dec is [2, d_in] (image, text) and b_pre [2, d_in] is added. An SAE that normalises per token kind
(``normalize_per_kind``, issue 15) cannot be expressed in SAELens, whose inputs have one normalisation: it is
saved with kind_mean [2, d_in] and kind_scale [2] (rows: text, image; see `vlmsae.sae.KIND_ROWS`) beside the
weights, and its architecture is written "kinds_<SAELens name>" (e.g. "kinds_topk"), which SAELens
refuses to open instead of reading it with the normalisation silently dropped; only vlmsae opens it. So is
an SAE with a k per token kind (``k_per_kind``), which SAELens would read with one k.

Reading checks cfg.json and the safetensors header (keys, shapes, dtypes)
before any tensor is read, and never unpickles. Writing fills a new folder beside
the target and swaps it in with renames (`vlmsae.files.write_folder_atomic`).

This module knows configs and tensors, not the SAE class: it writes an `SAEConfig` and the
SAE's `state_dict()`, and reads them back for `SAE.from_tensors` (`SAE.save` and `SAE.load` call it).
"""

import json
import math
import re
import reprlib
from dataclasses import asdict, fields
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from vlmsae.files import write_folder_atomic
from vlmsae.errors import ConfigError, NonFiniteError, SAEFileError
from vlmsae.saeconfig import DTYPES, MGSAEConfig, SAEConfig, check_metadata

CFG_FILE = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
# What a folder that write_sae may replace can hold (SAELens also writes sparsity.safetensors).
SAE_FILES = (CFG_FILE, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, "sparsity.safetensors")
FORMAT_VERSION = 1
# The layout version we follow; SAELens reads configs without it as pre-6.0.
SAELENS_LAYOUT_VERSION = "6.0.0"
# vlmsae architecture -> SAELens "architecture" (a BatchTopK SAE is a JumpReLU at inference), and back.
SAELENS_ARCHITECTURE = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard", "jumprelu": "jumprelu",
                        "mgsae": "mgsae"}
# A transcoder's (vlmsae.saeconfig.TRANSCODER_ARCHITECTURES): SAELens' Transcoder and JumpReLUTranscoder.
SAELENS_TRANSCODER_ARCHITECTURE = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder"}
FROM_SAELENS_ARCHITECTURE = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu", "mgsae": "mgsae",
                             "transcoder": "relu", "jumprelu_transcoder": "jumprelu"}
# Architectures only vlmsae writes: their files need the "vlmsae" section.
VLMSAE_ONLY = ("mgsae",)
# Prefixed to the SAELens architecture of an SAE that reads token kinds (normalize_per_kind, k_per_kind): SAELens
# knows no such architecture and refuses the file, which it would otherwise read without the per-kind means and
# scales or with one k (wrong latents).
KIND_PREFIX = "kinds_"
# Config fields SAELens has its own top-level keys for.
SAELENS_KEYS = ("d_in", "d_sae", "dtype", "apply_b_dec_to_input", "metadata", "d_out")
SAFETENSORS_DTYPES = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16"}


def write_sae(path: str | Path, cfg: SAEConfig, tensors: Mapping[str, Tensor]) -> None:
    """Write an SAE (its config and its `state_dict()`) to the folder `path` in the SAELens layout, replacing
    the folder as a whole.

    Raises SAEFileError if `path` is a file or a folder holding anything but an SAE's files, or if
    the metadata cannot be written; NonFiniteError if a tensor holds NaN or Inf (nothing is written
    then); OSError from the disk, leaving an existing folder exactly as it was.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SAEFileError(f"{path}: exists and is not a folder; choose a folder path")
    if path.is_dir():
        # The folder is replaced as a whole: never take a user's other files with it.
        others = sorted(p.name for p in path.iterdir() if p.name not in SAE_FILES)
        if others:
            raise SAEFileError(f"{path}: holds {others}, which are not part of an SAE folder; "
                               "save to a new folder, or move them out first")
    try:
        check_metadata(cfg.metadata)
    except ConfigError as err:
        raise SAEFileError(f"{path / CFG_FILE}: key 'metadata': {err}") from err
    saved = _saelens_tensors(tensors)
    for name, tensor in saved.items():
        if not torch.isfinite(tensor).all():
            raise NonFiniteError(f"{path / SAELENS_WEIGHTS}: tensor {name!r} holds NaN or Inf; not saving it")
    cfg_text = json.dumps(_saelens_cfg(cfg, tensors), indent=2, allow_nan=False)

    def write(folder: Path) -> None:
        save_file(saved, str(folder / SAELENS_WEIGHTS), metadata={"format": "pt"})
        (folder / CFG_FILE).write_text(cfg_text, encoding="utf-8")

    path.parent.mkdir(parents=True, exist_ok=True)
    # One folder swap: weights and config are never from two different saves.
    write_folder_atomic(path, write)


def read_sae(path: str | Path,
             device: torch.device | str | None = None) -> tuple[SAEConfig, dict[str, Tensor]]:
    """Read a vlmsae / SAELens folder or an EleutherAI sparsify folder: the config and the tensors of
    `SAE.from_tensors` (the SAE's `state_dict()`: input scale unfolded, W_enc as [d_in, d_sae]).

    Raises SAEFileError naming the file and the fix for a missing folder or file, a cfg.json that is
    not UTF-8 JSON (too deeply nested, an integer too long), not an object, or has a missing key or
    a value of the wrong type, and for weights that are unreadable or disagree with the config.
    """
    path = Path(path)
    if not path.is_dir():
        raise SAEFileError(f"{path}: no such folder; pass the folder holding {CFG_FILE}")
    cfg_path = path / CFG_FILE
    if not cfg_path.is_file():
        inside = sorted(p.name for p in path.iterdir() if (p / CFG_FILE).is_file())
        hint = f"; {path} holds the SAE folders {', '.join(inside)}: pass one of them" if inside else ""
        raise SAEFileError(f"{cfg_path}: missing; an SAE folder holds {CFG_FILE} and its weights{hint}")
    try:
        raw = json.loads(cfg_path.read_bytes().decode("utf-8"))
    # ValueError: not UTF-8, not JSON, or an integer too long to read; RecursionError: nested too deep
    except (ValueError, RecursionError) as err:
        raise SAEFileError(f"{cfg_path}: not valid JSON ({str(err)[:200]}); "
                           "restore the file or save the SAE again") from err
    if not isinstance(raw, dict):
        raise SAEFileError(f"{cfg_path}: must hold a JSON object, not {type(raw).__name__}; "
                           "restore the file or save the SAE again")

    if (path / SAELENS_WEIGHTS).is_file():
        weights_path = path / SAELENS_WEIGHTS
        cfg, act_scale, rescale = _config_from_saelens(raw, cfg_path)
        names = {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}
        transposed = set()
        if cfg.architecture in ("jumprelu", "batchtopk"):
            names["threshold"] = "threshold"
        elif cfg.architecture == "mgsae":
            names["b_pre"] = "b_pre"
        if cfg.normalize_per_kind:
            names |= {"kind_mean": "kind_mean", "kind_scale": "kind_scale"}
    elif (path / SPARSIFY_WEIGHTS).is_file():
        weights_path = path / SPARSIFY_WEIGHTS
        cfg, act_scale, rescale = _config_from_sparsify(raw, cfg_path, path.name), 1.0, False
        names = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "W_dec", "b_dec": "b_dec"}
        transposed = {"W_enc"}
    else:
        raise SAEFileError(f"{path}: holds neither {SAELENS_WEIGHTS} (SAELens / vlmsae) nor {SPARSIFY_WEIGHTS} (sparsify)")

    tensors = _read_tensors(weights_path, cfg, names, transposed, device)
    return cfg, _unfolded(cfg, tensors, act_scale, rescale)


def _saelens_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An SAE's tensors (its `state_dict()`) in SAELens' layout, the input scale folded in (exact: a power of two)."""
    scale = tensors["act_scale"].to(tensors["W_dec"].dtype)
    saved = {
        "W_enc": tensors["W_enc"] * scale,  # u = x*s - b_dec  ==  s * (x - b_dec/s)
        "b_enc": tensors["b_enc"],
        "W_dec": tensors["W_dec"] / scale,  # recon = (z W_dec + b_dec) / s
        "b_dec": tensors["b_dec"] / scale,
    }
    if "threshold" in tensors:  # jumprelu, batchtopk
        saved["threshold"] = tensors["threshold"]
    if "b_pre" in tensors:  # mgsae: u = x*s - b_pre, as b_dec above
        saved["b_pre"] = tensors["b_pre"] / scale
    if "kind_mean" in tensors:  # normalize_per_kind (act_scale is then 1): saved as they are
        saved["kind_mean"], saved["kind_scale"] = tensors["kind_mean"], tensors["kind_scale"]
    # Fresh contiguous CPU copies: safetensors refuses shared storage, and the
    # live parameters must not change under a running optimiser.
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in saved.items()}


def _saelens_cfg(cfg: SAEConfig, tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    dtype = next(name for name, dt in DTYPES.items() if dt == tensors["W_dec"].dtype)
    out: dict[str, Any] = {
        "architecture": _saelens_architecture(cfg),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "sae_lens_version": SAELENS_LAYOUT_VERSION,
        "metadata": dict(cfg.metadata),
    }
    if cfg.d_out is not None:
        out["d_out"] = cfg.d_out
    if cfg.architecture in ("topk", "mgsae"):
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    own = {name: value for name, value in asdict(cfg).items() if name not in SAELENS_KEYS}
    out["vlmsae"] = {"format_version": FORMAT_VERSION, "act_scale": float(tensors["act_scale"]), "config": own}
    return out


def _saelens_architecture(cfg: SAEConfig) -> str:
    """SAELens' name of the config's architecture (a transcoder's, where ``d_out`` is set); with
    ``normalize_per_kind`` or ``k_per_kind`` a name only vlmsae reads (``KIND_PREFIX``)."""
    name = (SAELENS_ARCHITECTURE if cfg.d_out is None else SAELENS_TRANSCODER_ARCHITECTURE)[cfg.architecture]
    return KIND_PREFIX + name if cfg.reads_kinds else name


def _need(raw: dict, key: str, cfg_path: Path, types: type) -> Any:
    if key not in raw:
        raise SAEFileError(f"{cfg_path}: missing key {key!r}; restore the file or save the SAE again")
    return _typed(key, raw[key], types, cfg_path)


def _typed(key: str, value: Any, hint: Any, cfg_path: Path) -> Any:
    """`value` if JSON gave it the type `hint` names (`int | None`, `float`, ...); an int where a float
    belongs becomes a float."""
    allowed = get_args(hint) or (hint,)
    if any(get_origin(t) is dict for t in allowed):  # a JSON object of ints (k_per_kind)
        if value is None and type(None) in allowed:
            return None
        if not isinstance(value, dict) or any(isinstance(v, bool) or not isinstance(v, int) for v in value.values()):
            raise SAEFileError(f"{cfg_path}: key {key!r} = {reprlib.repr(value)} must be an object of integers")
        return value
    if any(get_origin(t) is tuple for t in allowed):  # a JSON list of ints (matryoshka_widths)
        if value is None and type(None) in allowed:
            return None
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise SAEFileError(f"{cfg_path}: key {key!r} = {reprlib.repr(value)} must be a list of integers")
        return tuple(value)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise SAEFileError(f"{cfg_path}: key {key!r} = {value} is too large for a float; "
                               "use a finite number") from None
    if isinstance(value, bool) is not (bool in allowed) or not isinstance(value, allowed):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise SAEFileError(f"{cfg_path}: key {key!r} = {reprlib.repr(value)} has the wrong type; it must be {names}")
    return value


def _dtype_name(value: str, cfg_path: Path) -> str:
    name = value.removeprefix("torch.")
    if name not in DTYPES:
        raise SAEFileError(f"{cfg_path}: key 'dtype' = {value!r} is not a dtype; use one of {', '.join(DTYPES)}")
    return name


def _make_config(fields_: dict[str, Any], cfg_path: Path) -> SAEConfig:
    try:
        return _config_class(fields_["architecture"])(**fields_)
    except ConfigError as err:
        raise SAEFileError(f"{cfg_path}: {err}") from err


def _config_from_saelens(raw: dict, cfg_path: Path) -> tuple[SAEConfig, float, bool]:
    """SAEConfig, input scale, and whether to fold decoder norms (SAELens' rescale_acts_by_decoder_norm)."""
    architecture = _need(raw, "architecture", cfg_path, str)
    per_kind = architecture.startswith(KIND_PREFIX)  # normalize_per_kind or k_per_kind: only vlmsae reads it
    architecture = architecture.removeprefix(KIND_PREFIX)
    if architecture not in FROM_SAELENS_ARCHITECTURE:
        skip = " (a transcoder with a skip connection, W_skip)" if "skip_transcoder" in architecture else ""
        raise SAEFileError(
            f"{cfg_path}: key 'architecture' = {architecture!r}{skip} is not supported; "
            f"vlmsae opens {', '.join(FROM_SAELENS_ARCHITECTURE)}"
        )
    fields_: dict[str, Any] = {
        "d_in": _need(raw, "d_in", cfg_path, int),
        "d_sae": _need(raw, "d_sae", cfg_path, int),
        "dtype": _dtype_name(_need(raw, "dtype", cfg_path, str), cfg_path),
        "architecture": FROM_SAELENS_ARCHITECTURE[architecture],
        "apply_b_dec_to_input": raw.get("apply_b_dec_to_input", True),
        "metadata": raw.get("metadata", {}),
    }
    if not isinstance(fields_["apply_b_dec_to_input"], bool):
        raise SAEFileError(f"{cfg_path}: key 'apply_b_dec_to_input' must be true or false")
    if not isinstance(fields_["metadata"], dict):
        raise SAEFileError(f"{cfg_path}: key 'metadata' must be a JSON object")
    if architecture in ("topk", "mgsae"):
        fields_["k"] = _need(raw, "k", cfg_path, int)
    if (architecture in VLMSAE_ONLY or per_kind) and raw.get("vlmsae") is None:
        raise SAEFileError(f"{cfg_path}: architecture {raw['architecture']!r} needs the key 'vlmsae' that vlmsae writes "
                           "with it; restore the file or save the SAE again")
    if architecture in SAELENS_TRANSCODER_ARCHITECTURE.values():
        fields_["d_out"] = _need(raw, "d_out", cfg_path, int)
    normalize = raw.get("normalize_activations", "none")
    if normalize != "none":
        raise SAEFileError(
            f"{cfg_path}: key 'normalize_activations' = {normalize!r} is not supported; "
            "fold the normalisation into the weights first (SAELens: fold_activation_norm_scaling_factor)"
        )
    reshape = raw.get("reshape_activations", "none")
    if reshape != "none":
        raise SAEFileError(f"{cfg_path}: key 'reshape_activations' = {reshape!r} is not supported (residual-stream SAEs only)")
    rescale = raw.get("rescale_acts_by_decoder_norm", False) is True

    act_scale = 1.0
    own = raw.get("vlmsae")
    if own is not None:
        if not isinstance(own, dict) or not isinstance(own.get("config"), dict):
            raise SAEFileError(f"{cfg_path}: key 'vlmsae' must be an object with a 'config' object")
        config_class = _config_class(fields_["architecture"])
        known = {f.name for f in fields(config_class)} - set(SAELENS_KEYS)
        types = get_type_hints(config_class)
        for key, value in own["config"].items():
            key = "architecture" if key == "kind" else key  # its name in files written before 0.2
            if key not in known:
                raise SAEFileError(f"{cfg_path}: key 'vlmsae.config.{key}' is unknown to this vlmsae version")
            fields_[key] = _typed(f"vlmsae.config.{key}", value, types[key], cfg_path)
        act_scale = _typed("vlmsae.act_scale", own.get("act_scale", 1.0), float, cfg_path)
        if act_scale <= 0 or math.frexp(act_scale)[0] != 0.5:
            raise SAEFileError(f"{cfg_path}: key 'vlmsae.act_scale' = {act_scale!r} must be a positive power of two")
        names = SAELENS_ARCHITECTURE if fields_.get("d_out") is None else SAELENS_TRANSCODER_ARCHITECTURE
        if names.get(fields_.get("architecture")) != architecture:
            raise SAEFileError(
                f"{cfg_path}: key 'vlmsae.config.architecture' = {fields_.get('architecture')!r} disagrees with "
                f"'architecture' = {architecture!r}"
            )
        if architecture in ("topk", "mgsae") and fields_["k"] != raw["k"]:
            raise SAEFileError(f"{cfg_path}: key 'vlmsae.config.k' = {fields_['k']!r} disagrees with 'k' = {raw['k']!r}")
        reads_kinds = fields_.get("normalize_per_kind", False) or fields_.get("k_per_kind") is not None
        if reads_kinds != per_kind:
            raise SAEFileError(f"{cfg_path}: keys 'vlmsae.config.normalize_per_kind' = "
                               f"{fields_.get('normalize_per_kind', False)!r} and 'vlmsae.config.k_per_kind' = "
                               f"{fields_.get('k_per_kind')!r} disagree with 'architecture' = "
                               f"{raw['architecture']!r} (the {KIND_PREFIX!r} prefix marks either); restore the file "
                               "or save the SAE again")
    return _make_config(fields_, cfg_path), float(act_scale), rescale


def _config_class(architecture: str) -> type[SAEConfig]:
    return MGSAEConfig if architecture == "mgsae" else SAEConfig


def _config_from_sparsify(raw: dict, cfg_path: Path, folder_name: str) -> SAEConfig:
    d_in = _need(raw, "d_in", cfg_path, int)
    k = _need(raw, "k", cfg_path, int)
    d_sae = raw.get("num_latents") or d_in * _need(raw, "expansion_factor", cfg_path, int)
    for key, fine in (("activation", "topk"), ("transcode", False), ("skip_connection", False), ("signed", False)):
        if raw.get(key, fine) != fine:
            raise SAEFileError(f"{cfg_path}: key {key!r} = {raw[key]!r} is not supported; vlmsae opens plain TopK SAEs")
    # sparsify names the folder after the hooked module, e.g. "layers.9".
    metadata: dict[str, Any] = {"sparsify_hookpoint": folder_name}
    match = re.fullmatch(r"(?:.*\.)?(?:layers|h)[._](\d+)", folder_name)
    if match:
        metadata["hook_name"] = f"blocks.{match.group(1)}.hook_resid_post"
    # The dtype is set from the tensors once the header is read.
    return _make_config({"d_in": d_in, "d_sae": d_sae, "k": k, "architecture": "topk", "metadata": metadata}, cfg_path)


def _read_tensors(
    weights_path: Path, cfg: SAEConfig, names: dict[str, str], transposed: set[str], device
) -> dict[str, Tensor]:
    """Check the header against `cfg`, then read the tensors (vlmsae name -> tensor)."""
    per_modality = [2] if cfg.architecture == "mgsae" else []  # mgsae: image and text biases
    d_out = cfg.d_out or cfg.d_in  # a transcoder's decoder writes d_out
    shapes = {
        "W_enc": [cfg.d_in, cfg.d_sae],
        "b_enc": [cfg.d_sae],
        "W_dec": [cfg.d_sae, d_out],
        "b_dec": per_modality + [d_out],
        "b_pre": per_modality + [cfg.d_in],
        "threshold": [cfg.d_sae],
        "kind_mean": [2, cfg.d_in],  # normalize_per_kind: rows text, image (vlmsae.sae.KIND_ROWS)
        "kind_scale": [2],
    }
    try:
        with safe_open(weights_path, framework="pt", device="cpu") as handle:
            keys = set(handle.keys())
            wanted = set(names.values())
            if keys != wanted:
                missing, extra = sorted(wanted - keys), sorted(keys - wanted)
                raise SAEFileError(f"{weights_path}: tensors do not match the config (missing {missing}, unexpected {extra})")
            dtypes = set()
            for name, key in names.items():
                meta = handle.get_slice(key)
                shape = list(meta.get_shape())
                expected = shapes[name][::-1] if name in transposed else shapes[name]
                if shape != expected:
                    raise SAEFileError(f"{weights_path}: key {key!r} has shape {shape}, config says {expected}")
                dtypes.add(meta.get_dtype())
            if len(dtypes) != 1 or next(iter(dtypes)) not in SAFETENSORS_DTYPES:
                raise SAEFileError(f"{weights_path}: tensor dtypes {sorted(dtypes)} must be one of {sorted(SAFETENSORS_DTYPES)}, all alike")
            file_dtype = SAFETENSORS_DTYPES[dtypes.pop()]
            if weights_path.name == SPARSIFY_WEIGHTS:
                cfg.dtype = file_dtype
            elif file_dtype != cfg.dtype:
                raise SAEFileError(f"{weights_path}: tensors are {file_dtype} but key 'dtype' in {CFG_FILE} says {cfg.dtype}")
        with safe_open(weights_path, framework="pt", device=str(device or "cpu")) as handle:
            tensors = {name: handle.get_tensor(key) for name, key in names.items()}
    except SafetensorError as err:
        raise SAEFileError(f"{weights_path}: not a readable safetensors file ({err})") from err
    return {name: t.T if name in transposed else t for name, t in tensors.items()}


def _unfolded(cfg: SAEConfig, tensors: dict[str, Tensor], act_scale: float, rescale: bool) -> dict[str, Tensor]:
    """`tensors` as read (SAELens layout, scale folded in) -> the SAE's own tensors, `SAE.from_tensors`' input."""
    if rescale:
        # SAELens' rescale_acts_by_decoder_norm multiplies pre-activations by
        # the decoder row norms; folding them into the encoder is equivalent.
        norms = tensors["W_dec"].norm(dim=1)
        tensors["W_enc"] = tensors["W_enc"] * norms
        tensors["b_enc"] = tensors["b_enc"] * norms
        tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
    device = tensors["W_dec"].device
    scale = torch.tensor(act_scale, dtype=tensors["W_dec"].dtype, device=device)
    own = {"W_enc": tensors["W_enc"] / scale, "b_enc": tensors["b_enc"], "W_dec": tensors["W_dec"] * scale,
           "b_dec": tensors["b_dec"] * scale, "act_scale": torch.tensor(act_scale, dtype=torch.float32, device=device)}
    if cfg.architecture in ("jumprelu", "batchtopk"):
        own["threshold"] = tensors["threshold"]
    if cfg.architecture == "mgsae":
        own["b_pre"] = tensors["b_pre"] * scale
    if cfg.normalize_per_kind:
        own["kind_mean"], own["kind_scale"] = tensors["kind_mean"], tensors["kind_scale"]
    return own
