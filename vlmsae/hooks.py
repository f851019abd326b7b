"""The one module that registers hooks on a model.

``attach(model, {(layer, site): fn})`` is a context manager: while it is open, ``fn(resid, fwd)``
sees the residual stream at each site on every forward (each decode step of ``generate()``
included, where ``resid`` holds only the new positions) and may return a replacement. On exit
(normal, an exception in the block, or an exception in a hook) every handle is removed in
``finally``, so the model is exactly as it was.

Sites, named as TransformerLens names them (:mod:`vlmsae.sites`; a key may also be the hook name,
``"blocks.9.hook_resid_post"``, ``"vision.blocks.3.hook_resid_post"``, ``"hook_image_embeds"``):

- ``resid_pre``: the input of decoder layer L; ``resid_post``: its output;
- ``mlp_in``: the input of layer L's MLP (after its pre-norm); ``mlp_out``: what the MLP adds to the residual (after
  its post-norm, where the family has one: the adapter row's ``mlp_out``);
- ``vision.resid_pre`` / ``vision.resid_post``: the same at layer L of the vision tower (``text.`` for a dual
  encoder's text tower);
- ``vision.proj_out``: the projector's output; ``image_embeds`` / ``text_embeds``: a dual encoder's pooled
  embeddings (layer 0: these sites have no layers).

A tower's hooks see ``(batch, seq, d)`` too, whatever the tower's own layout (:mod:`vlmsae.streams`).
"""

from __future__ import annotations

import inspect
import itertools
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import nn

from .adapters import Kind, Model, ModelInfo, layers
from .errors import LayerIndexError, SiteError, UnsupportedModelError
from .sites import LENS_HOOKS, OUTPUT_SITES, parse_site, reads_input, stream_of
from .sites import SITES  # noqa: F401  (exported as vlmsae.SITES from here)
from .streams import TowerCall, View, pooled_view


@dataclass(eq=False)
class Forward:
    """What one call of the model's forward is about, shared by every hook it fires."""

    info: ModelInfo
    index: int
    """0 for the first forward inside the context, then 1, 2, ..."""
    ids: torch.Tensor | None
    """``(batch, seq)`` ids of the positions this forward computes (only the new ones under a KV cache)."""
    attention_mask: torch.Tensor | None
    """``(batch, past + seq)`` or ``None``."""
    past: int
    """Positions already in the KV cache: 0 for a fresh sequence, > 0 for a decode step."""
    special_ids: frozenset[int] = field(default_factory=frozenset)
    generated_from: int | None = None
    """Positions at or after this index of the whole sequence were generated (``None``: none were).

    Inside ``generate()``: the prompt's length, cached or not. Outside it: ``past`` for a decode step
    of your own loop (every position fed in under a KV cache is generated), ``None`` otherwise."""
    direct: bool = False
    """True when a hooked layer ran outside a call of the model's own forward (a submodule called directly)."""
    stream: str = "decoder"
    """Whose positions: ``"decoder"``, ``"vision"`` (a vision tower's patches, a projector's image tokens, pooled
    image embeddings) or ``"text"`` (a dual encoder's text tower)."""
    view: View | None = None
    """Where the positions are laid out by the tensor's shape (a vision tower, pooled embeddings): their kinds and
    how the tower's own tensor maps onto ``(batch, seq)`` (:mod:`vlmsae.streams`); ``None``: by token ids."""

    @cached_property
    def kinds(self) -> torch.Tensor:
        """``(batch, seq)`` int8 :class:`~vlmsae.adapters.Kind` of each position; GENERATED past the prompt.

        Raises ``ValueError`` when the forward carried no token ids (only ``inputs_embeds``, or a
        submodule called directly), since the kinds are then unknown.
        """
        if self.view is not None:
            return self.view.kinds
        if self.ids is None:
            if self.direct:
                raise ValueError(
                    f"a hooked layer of this {self.info.family} model ran outside a call of the model itself (a "
                    "submodule called directly), so its token kinds are unknown; call the whole model, or pass "
                    "where= a callable that does not read fwd.kinds")
            raise ValueError(
                f"forward {self.index} got no {self.info.ids_key!r}, so token kinds are unknown; call the model "
                f"with {self.info.ids_key}=... (not only inputs_embeds) to get a kind mask")
        kinds = self.info.kinds(self.ids, self.attention_mask, self.special_ids)
        if self.generated_from is not None:
            start = max(0, self.generated_from - self.past)
            new = kinds[:, start:]
            new[new != Kind.PAD] = Kind.GENERATED
        return kinds

    @property
    def positions(self) -> torch.Tensor:
        """``(seq,)`` index of each new position in the whole sequence."""
        seq, device = (self.ids.shape[1], self.ids.device) if self.ids is not None else \
            (self.kinds.shape[1], self.kinds.device)
        return torch.arange(self.past, self.past + seq, device=device)


HookFn = Callable[[torch.Tensor, Forward], "torch.Tensor | None"]


class StopForward(Exception):
    """Raised by the hook of the deepest site to end a forward early; caught at the model's own forward."""


def check_sites(info: ModelInfo, sites) -> list[tuple[int, str]]:
    """Validate ``(layer, site)`` pairs in vlmsae's spelling against the model; the error names the bad value and
    what is valid (for a hook name, the pair it stands for: :func:`vlmsae.sites.parse_site` turns one into the
    other).

    Raises:
        SiteError: a site the model does not have (``info.sites``), or a pair listed twice.
        LayerIndexError: a layer outside ``0..n - 1`` for the site's ``n`` layers (or not an int, or a hook name);
            0 for a site without layers.
    """
    sites = list(sites)
    for layer, site in sites:
        if site not in info.stacks:
            hint = f" ({site!r} is TransformerLens's name of {LENS_HOOKS[site]!r})" if site in LENS_HOOKS else ""
            raise SiteError(f"site={site!r} is not a hook site of this {info.family} model; valid sites: "
                            f"{info.sites}{hint}")
        if isinstance(layer, str):
            index, named = parse_site(layer)  # a hook name vlmsae has no site for raises here
            if isinstance(index, int):
                raise LayerIndexError(f"layer={layer!r} is a hook name, which this call does not read; "
                                      f"pass layer={index}, site={named!r}")
        n = len(info.stack(site).modules)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            if site in OUTPUT_SITES:
                raise LayerIndexError(f"layer={layer!r} for site {site!r}, which has no layers; pass layer=0, or the "
                                      f"hook name {info.hook_name(0, site)!r}")
            what = "decoder layers" if stream_of(site) == "decoder" else f"{stream_of(site)} tower layers"
            if isinstance(layer, str):
                raise LayerIndexError(f"layer={layer!r} is neither a layer index nor a hook name vlmsae reads; pass "
                                      f"an int in 0..{n - 1} ({n} {what}) or a hook name such as "
                                      f"{info.hook_name(n - 1, site)!r}")
            last = f" (count from 0: the last is {n - 1})" if isinstance(layer, int) and layer < 0 else ""
            raise LayerIndexError(
                f"layer={layer!r} is out of range for this {info.family} model with {n} {what}; valid layers: "
                f"0..{n - 1}{last}")
    seen = set()
    for key in sites:
        if key in seen:
            raise SiteError(f"site {key} is attached twice in one context; list each (layer, site) once")
        seen.add(key)
    return sites


def _replace(new: torch.Tensor, resid: torch.Tensor, key) -> torch.Tensor:
    if new.shape != resid.shape:
        raise SiteError(f"a hook at {key} returned shape {tuple(new.shape)}; it must keep {tuple(resid.shape)}")
    return new.to(device=resid.device, dtype=resid.dtype)


def _as_device(device) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def _dispatch_device(module: nn.Module) -> torch.device | None:
    """The execution device of accelerate's hook on ``module`` itself, or ``None`` when it has none."""
    hook = getattr(module, "_hf_hook", None)
    for inner in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        device = getattr(inner, "execution_device", None)
        if device is not None:
            return _as_device(device)
    return None


def execution_device(layer: nn.Module) -> torch.device | None:
    """The device a layer computes on, or ``None`` when nothing says (no hook, every weight on ``meta``).

    accelerate's hook knows where a dispatched layer runs, while its weights may sit on ``meta``
    (offloaded to CPU or disk). ``dispatch_model`` / ``device_map`` put that hook on the layer itself;
    ``cpu_offload`` / ``disk_offload`` only on the submodules that hold weights, so those are read
    next (the first one met, depth first). Without any hook: the device of the first real parameter.
    """
    for module in layer.modules():  # the layer itself first
        device = _dispatch_device(module)
        if device is not None:
            return device
    param = next((p for p in layer.parameters() if p.device.type != "meta"), None)
    return None if param is None else param.device


def find_cache(values) -> object | None:
    """The transformers ``Cache`` among a forward's argument values, whatever keyword carries it.

    transformers renames the keyword (``past_key_values`` until 5.23, ``cache`` from 5.24); the
    class stays, so vlmsae recognises the object, not the name.
    """
    from transformers.cache_utils import Cache

    return next((v for v in values if isinstance(v, Cache)), None)


class Generation:
    """One running ``generate()`` call: its prompt is the first forward's whole sequence."""

    def __init__(self):
        self.prompt_len: int | None = None
        self.steps = 0


def describe_forward(info: ModelInfo, module: nn.Module, args: tuple, kwargs: dict, *, index: int = 0,
                     special_ids: frozenset[int] = frozenset(), generation: Generation | None = None) -> Forward:
    """The :class:`Forward` of one call ``module(*args, **kwargs)`` of the model's own forward.

    What :func:`attach` builds at each call, for a front end that sees the call's arguments itself
    (an nnsight trace reads them as ``model.inputs``). ``generation`` is the running ``generate()``
    call, or ``None``: then a forward after a KV cache's ``past`` positions (a decode step) counts
    every position it feeds as generated, which is what ``generate()`` does under the KV cache.
    Raises :class:`~vlmsae.errors.UnsupportedModelError` as :func:`attach` does.
    """
    if args:  # positional inputs: name them as the forward's signature does
        kwargs = inspect.signature(type(module).forward).bind_partial(module, *args, **kwargs).arguments
    ids = kwargs.get(info.ids_key)
    cache = find_cache(kwargs.values())
    past = int(cache.get_seq_length()) if cache is not None else 0
    generated_from = past if past > 0 else None
    if generation is not None and ids is not None:
        total = past + ids.shape[1]
        if generation.prompt_len is None:
            generation.prompt_len = total
        elif total <= generation.prompt_len:
            names = ", ".join(f"{k}: {type(v).__name__}" for k, v in kwargs.items() if v is not None)
            raise UnsupportedModelError(
                f"decode step {generation.steps} of generate() on this {info.family} model feeds "
                f"{ids.shape[1]} position(s) but vlmsae found no transformers Cache among the forward's "
                f"arguments ({names}), so it cannot place them after the {generation.prompt_len}-position "
                "prompt; report your transformers version to vlmsae, or generate with use_cache=False")
        generation.steps += 1
        generated_from = generation.prompt_len
    return Forward(info, index, ids, kwargs.get(info.mask_key), past, special_ids, generated_from)


class _ThreadState(threading.local):
    """Per thread, so that two threads calling one hooked model never see each other's forward."""

    def __init__(self):
        self.forward: Forward | None = None
        self.generation: Generation | None = None
        self.fired: set = set()  # sites whose hook ran in this call (a stopping context)
        self.towers: dict = {}  # stream -> the last call of that tower (its layout, or its text Forward)


def _patch(module: nn.Module, name: str, replacement) -> Callable[[], None]:
    """Set ``module.name`` on the instance; return the function that puts back what was there."""
    had = name in module.__dict__
    saved = module.__dict__.get(name)
    setattr(module, name, replacement)

    def restore():
        if had:
            module.__dict__[name] = saved
        else:
            module.__dict__.pop(name, None)
    return restore


@contextmanager
def attach(model: Model, fns: Mapping[tuple[int, str], HookFn], *, stop: bool = False,
           special_ids=None) -> Iterator[ModelInfo]:
    """Run ``fns[(layer, site)](resid, fwd)`` at each site on every forward inside the block.

    A key is ``(layer, site)`` or a hook name (``"blocks.9.hook_resid_post"``, ``"vision.blocks.3.hook_resid_post"``,
    ``"hook_image_embeds"``: :func:`vlmsae.sites.parse_site`); two keys naming one site are an error. A site
    outside the decoder (a tower's layer, the projector, pooled embeddings) is hooked the same way: a pre-hook on
    its tower reads each call's layout (:mod:`vlmsae.streams`).

    ``fwd`` (a :class:`Forward`) says which positions this forward computes and their token kinds.
    A decode step is known by the transformers ``Cache`` among the forward's arguments (whatever
    its keyword); inside ``generate()`` the prompt is the first forward's sequence, so positions
    past it are GENERATED with the KV cache or without it (``use_cache=False``). The state is per
    thread and per call of the model: a submodule called directly gets no earlier call's kinds.

    ``stop=True`` ends each forward right after the deepest site, the last of the block's sites to run (the model
    call then returns ``None``); use it when only activations are wanted. On a plain model the deepest hook raises
    out of the forward; on a model whose layers a sharded engine holds (FSDP2 ``fully_shard``, FSDP,
    DeepSpeed ZeRO-3: :func:`sharded`), where leaving a forward midway can leave its collectives
    unmatched, the decoder's layer list is cut after the deepest site for the block instead, so the
    forward ends normally, on every rank alike (the final norm and head still run on the cut stack,
    one layer's cost or less). ``special_ids`` adds token ids counted
    as SPECIAL (e.g. a tokenizer's ``all_special_ids``).
    Validates everything before registering anything; removes every hook in ``finally``.

    ``fns[(layer, site)](resid, fwd)`` gets ``resid`` ``(batch, seq, d)`` (``d``: ``info.width(site)``) in the
    model's dtype on the layer's device and returns ``None`` (no change) or a tensor of the same shape. At a
    vision tower's site ``batch`` counts images and ``seq`` patches (Qwen-VL's flat ``(patches, d)`` shown per
    image, in the processor's order); at pooled embeddings ``seq`` is 1. Outside the decoder the replacement
    is written into the module's own tensor in place, so that what transformers captured as ``hidden_states``
    (LLaVA's ``vision_feature_layer``) sees it too.

    Raises:
        SiteError: a site the model does not have (``info.sites``), a ``(layer, site)`` listed twice, no sites, or
            a hook that returns another shape.
        LayerIndexError: a layer outside ``0..n - 1`` for the site's ``n`` layers (0 for a site without layers).
        UnsupportedModelError: not a supported family; a second stopping context on one model; or, during
            a forward, a decode step of ``generate()`` that cannot be placed in the sequence (no ``Cache``
            among the forward's arguments).
    """
    info = layers(model)
    named = [(parse_site(*key) if isinstance(key, tuple) else parse_site(key), fn) for key, fn in fns.items()]
    sites = check_sites(info, [key for key, _ in named])  # two spellings of one site are caught here
    fns = dict(named)
    if not sites:
        raise SiteError("attach() got no sites; pass at least one {(layer, site): fn}")
    root = info.model
    if stop and hasattr(root.forward, "__wrapped_by_vlmsae__"):
        raise UnsupportedModelError("a stopping vlmsae context is already open on this model; nest none in another")
    truncate = stop and sharded(root)
    tracker = _Tracker(info, special_ids, stop_after=sites if stop and not truncate else ())
    handles, restores = [], []
    try:
        handles.append(root.register_forward_pre_hook(tracker.begin, with_kwargs=True))
        handles.append(root.register_forward_hook(tracker.end, with_kwargs=True, always_call=True))
        for stream in {stream_of(site) for _, site in sites} & set(info.towers):
            tower = info.towers[stream][0]
            handles.append(tower.register_forward_pre_hook(tracker.tower_begin(stream), with_kwargs=True))
        for key in sites:
            layer_index, site = key
            module = info.stack(site).modules[layer_index]
            locate = None if stream_of(site) == "decoder" else tracker.locator(site)
            if reads_input(site):
                device = execution_device(module) if locate is None else None
                hook = _pre_hook(key, fns[key], tracker, device, locate)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(_post_hook(key, fns[key], tracker, locate)))
        if callable(getattr(root, "generate", None)):
            restores.append(_patch(root, "generate", tracker.generating(root.generate)))
        decoder = [layer for layer, site in sites if stream_of(site) == "decoder"]
        if truncate and decoder:
            restores.append(_truncated(info, max(decoder) + 1))
        if stop:
            restores.append(_patch(root, "forward", _stopping(root.forward)))
        yield info
    finally:
        for handle in handles:
            handle.remove()
        for restore in reversed(restores):
            restore()


class _Tracker:
    """The :class:`Forward` that every hook of one model call shares, per thread, and the running ``generate()``;
    each tower's call (its positions' layout) and, in a stopping context, the sites that have run in this call."""

    def __init__(self, info: ModelInfo, special_ids, stop_after=()):
        self.info = info
        self.extra = frozenset(int(i) for i in (special_ids or ()))
        self.state = _ThreadState()
        self.count = itertools.count()
        self.stop_after = frozenset(stop_after)

    def begin(self, module, args, kwargs) -> None:
        """Forward pre-hook of the model: classify the call (fresh, decode step, inside ``generate()``)."""
        self.state.forward = describe_forward(self.info, module, args, kwargs, index=next(self.count),
                                              special_ids=self.extra, generation=self.state.generation)
        self.state.fired = set()

    def end(self, module, args, kwargs, output) -> None:
        """Forward hook of the model (always called): a submodule called directly later must not inherit this call."""
        self.state.forward = None

    def current(self) -> Forward:
        """The running call's :class:`Forward`, or a ``direct`` one for a submodule called on its own."""
        return self.state.forward or Forward(self.info, next(self.count), None, None, 0, self.extra, direct=True)

    def fired(self, key) -> bool:
        """Note that the hook at ``key`` ran; True when it was the last of the sites a stopping context waits for
        in this call (the deepest, for decoder layers; the order of a tower and the decoder need not be known)."""
        if not self.stop_after:
            return False
        self.state.fired.add(key)
        if self.state.fired >= self.stop_after:
            self.state.fired = set()
            return True
        return False

    def tower_begin(self, stream: str):
        """The forward pre-hook of a tower: read each call's layout (a vision tower) or token ids (a text tower)."""
        row = self.info.towers[stream][1]

        def begin(module, args, kwargs) -> None:
            if stream == "text":
                fwd = describe_forward(self.info, module, args, kwargs, index=next(self.count), special_ids=self.extra)
                self.state.towers[stream] = replace(fwd, stream="text")
            else:
                self.state.towers[stream] = {"call": TowerCall(row, module, args, kwargs), "index": next(self.count)}
        return begin

    def locator(self, site: str):
        """``locate(x) -> (shown, fwd, view)`` for a site outside the decoder: its tensor ``x`` as ``(batch, seq, d)``,
        the :class:`Forward` of its positions, and the :class:`~vlmsae.streams.View` that writes ``shown`` back."""
        stream = stream_of(site)

        def locate(x: torch.Tensor):
            if site in ("image_embeds", "text_embeds"):
                view = pooled_view(x, Kind.IMAGE if stream == "vision" else Kind.TEXT)
                return view.show(x), self._stream_forward(stream, view), view
            if stream == "text":
                return x.clone(), self._text_forward(), None  # a copy: a later hook may write x in place
            state = self.state.towers.get("vision")
            if state is None:
                raise UnsupportedModelError(f"the {site} site of this {self.info.family} model ran before its vision "
                                            "tower; call the model (or its vision tower), not a layer on its own")
            group = "proj" if site in OUTPUT_SITES else "resid"
            view = state["call"].view(group, x)
            fwd = state.get(group)
            if fwd is None or fwd.view is not view:
                fwd = state[group] = self._stream_forward(stream, view, state["index"])
            return view.show(x), fwd, view
        return locate

    def _stream_forward(self, stream: str, view: View, index: int | None = None) -> Forward:
        return Forward(self.info, next(self.count) if index is None else index, None, None, 0, self.extra,
                       stream=stream, view=view)

    def _text_forward(self) -> Forward:
        fwd = self.state.towers.get("text")
        if fwd is None:
            raise UnsupportedModelError(f"a text-tower layer of this {self.info.family} model ran outside a call of its "
                                        "text tower; call the model or its text tower")
        return fwd

    def generating(self, inner):
        """``generate`` wrapped so that its forwards know they belong to one generation."""
        def generate(*args, **kwargs):
            outer, self.state.generation = self.state.generation, Generation()
            try:
                return inner(*args, **kwargs)
            finally:
                self.state.generation = outer
        return generate


def _post_hook(key, fn: HookFn, tracker: _Tracker, locate=None):
    """A forward hook on a layer (or an output module): ``fn`` sees (and may replace) its output.

    At a decoder layer the replacement is returned. Elsewhere (``locate`` given) ``fn`` sees the tensor as
    ``(batch, seq, d)`` and its replacement is written into the layer's own output tensor: LLaVA reads the vision
    tower's ``hidden_states[vision_feature_layer]``, which transformers' output capture took from the layer's
    output before any later hook could replace it, so only an in-place write reaches the decoder."""
    def hook(module, args, output):
        resid = output[0] if isinstance(output, tuple) else output
        if locate is None:
            new = fn(resid, tracker.current())
            if new is not None:
                new = _replace(new, resid, key)
                output = (new, *output[1:]) if isinstance(output, tuple) else new
        else:
            shown, fwd, view = locate(resid)
            new = fn(shown, fwd)
            if new is not None:
                _write(resid, _replace(new, shown, key), view)
            new = None  # written in place: the output object stays
        if tracker.fired(key):
            raise StopForward
        return output if new is not None else None
    return hook


def _pre_hook(key, fn: HookFn, tracker: _Tracker, device: torch.device | None, locate=None):
    """A forward pre-hook on a layer: ``fn`` sees (and may replace) the layer's input, on the layer's device.

    Outside the decoder (``locate`` given) the replacement is written into the input tensor itself, which is the
    previous layer's output as transformers' output capture holds it (see :func:`_post_hook`)."""
    def hook(module, args, kwargs):
        resid = args[0] if args else kwargs["hidden_states"]  # an MLP's input comes positionally
        if locate is not None:
            shown, fwd, view = locate(resid)
            new = fn(shown, fwd)
            if new is not None:
                _write(resid, _replace(new, shown, key), view)
            if tracker.fired(key):
                raise StopForward
            return None
        if device is not None and resid.device != device:
            resid = resid.to(device)  # what the layer itself will compute on
        new = fn(resid, tracker.current())
        if tracker.fired(key):
            raise StopForward
        if new is None:
            return None
        new = _replace(new, resid, key)
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
    return hook


def _write(x: torch.Tensor, new: torch.Tensor, view: View | None) -> None:
    """Write ``new`` (``(batch, seq, d)``) into a tower's own tensor ``x``, in place (recorded by autograd when grad
    is on, so gradients flow through the edit as through a returned replacement)."""
    if view is None:
        x.copy_(new)
    else:
        view.put(x, new.to(x.device))


def _stopping(inner):
    """The model's forward, returning ``None``: the deepest site ended it early (or it ran a cut layer list)."""
    def forward(*args, **kwargs):
        try:
            inner(*args, **kwargs)
        except StopForward:
            pass
    forward.__wrapped_by_vlmsae__ = True
    return forward


def _truncated(info: ModelInfo, n: int) -> Callable[[], None]:
    """Swap the decoder's layer list for its first ``n`` layers; return the function that puts the whole list back.

    The layers themselves (and whatever engine state they carry) are untouched: a forward simply runs fewer of them.
    """
    parent_path, _, name = info.layer_path.rpartition(".")
    parent = info.model.get_submodule(parent_path)
    whole = parent._modules[name]
    parent._modules[name] = nn.ModuleList(list(whole)[:n])

    def restore():
        parent._modules[name] = whole
    return restore


def sharded(model: nn.Module) -> bool:
    """True when a sharded data-parallel engine holds the model's parameters: FSDP2 (``fully_shard``: its modules
    are ``FSDPModule``), FSDP (``FullyShardedDataParallel``) or DeepSpeed ZeRO-3 (parameters carry ``ds_id``).
    Known by the objects, not by names."""
    engines = []
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        engines = [FSDPModule, FullyShardedDataParallel]
    except ImportError:  # a torch build without torch.distributed
        pass
    if engines and any(isinstance(m, tuple(engines)) for m in model.modules()):
        return True
    return any(hasattr(p, "ds_id") for p in model.parameters())
