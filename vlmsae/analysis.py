"""Latent analysis over a dataset: statistics, top-activating examples with patch heatmaps, image x question grids.

One pass of :func:`scan` over batches of model inputs feeds everything: per-latent firing
statistics and, for each latent, the running ``n_examples`` examples where it peaks highest, kept on
the SAE's device. An example's activation is its peak over the selected positions, so the top examples
are distinct examples (images), not several patches of one image.

For families whose decoder stream holds image tokens (LLaVA, Qwen-VL), and at every vision-tower site and
projector output, each top example keeps the latent's activation at every image token (patch), mapped back onto
the patch grid by :func:`patch_grid`:

- LLaVA: one token per patch, row-major over the ``image_size / patch_size`` grid;
- Qwen-VL: one token per ``merge x merge`` block of patches (the vision tower's spatial merge),
  row-major over the merged grid, so each token's value covers its whole block;
- a vision tower: one position per patch (after the class token, where there is one), row-major; Qwen-VL's
  ViT runs over ``merge x merge`` blocks of patches (the image processor's order), the blocks row-major.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from einops import rearrange, repeat
from torch import Tensor
from tqdm.auto import tqdm

from .adapters import Kind, Model, layers
from .checks import check_entry, check_latents
from .deprecation import renamed_attributes, renamed_kwargs, warn_renamed
from .errors import ConfigError
from .metrics import auroc
from .positions import Where, where_kinds, where_mask
from .record import record
from .sae import SAE
from .sites import stream_of

DEFAULT_WHERE = ("image", "text", "generated")
"""Positions a scan reads by default: every content token, never padding or special tokens (BOS
is an attention sink whose huge activations would fill every latent's top examples)."""


@dataclass(frozen=True)
class PatchLayout:
    """How a model's image tokens tile the image: ``grid`` patches, ``merge x merge`` patches per token."""

    grid: tuple[int, int]
    """(rows, cols) of patches."""
    merge: int
    """Patches per token along each side: 1 for LLaVA and PaliGemma, ``spatial_merge_size`` (2) for Qwen-VL, the
    pooling kernel for Gemma 3, ``scale_factor`` (the pixel shuffle) for Idefics3 / SmolVLM; 1 in a vision tower."""
    block: int = 1
    """The tokens run over ``block x block`` blocks, row-major inside each block and the blocks row-major (Qwen-VL's
    vision tower: ``spatial_merge_size``); 1: plainly row-major."""

    @property
    def n_tokens(self) -> int:
        return (self.grid[0] // self.merge) * (self.grid[1] // self.merge)


def patch_layout(model: Model, batch: dict, site: str = "resid_post") -> PatchLayout | None:
    """The patch layout of the images in ``batch`` at ``site``; ``None`` where the site holds no image tokens (a
    ViT-GPT2 decoder, a text tower, pooled embeddings).

    In the decoder and at the projector's output (``vision.proj_out``): where the family's ``patch_grid`` is
    ``"vision_config"`` the grid is ``image_size // patch_size`` per side and the merge follows from the image
    tokens of the first example (merged tokens run row-major over ``merge x merge`` blocks: LLaVA, PaliGemma,
    Gemma 3's average pool, Idefics3's pixel shuffle); ``"image_grid_thw"`` (Qwen-VL) reads the batch's grid. In a
    vision tower one position is one patch: the same grid, merge 1, and Qwen-VL's ``merge x merge`` blocks.

    Raises:
        ConfigError: a Qwen-VL batch without ``image_grid_thw``, or with images of several sizes or frames; an
            example whose image tokens do not tile the patch grid (several images, or an image split into crops).
    """
    info = layers(model)
    tower = site.startswith("vision.") and site != "vision.proj_out"
    if not tower and ((stream_of(site) != "decoder" and site != "vision.proj_out") or not info.has_image_tokens):
        return None
    vision = info.tower_config("vision")
    if info.patch_grid == "vision_config":
        side = vision.image_size // vision.patch_size
        if tower:
            return PatchLayout((side, side), 1)
        count = int((batch[info.ids_key][0] == info.image_token_id).sum())
        merge = math.isqrt(side * side // count) if count else 0
        if not count or merge * merge * count != side * side:
            raise ConfigError(f"{count} image tokens in the first example do not tile a {side}x{side} patch grid; "
                              "heatmaps need one image per example, not split into crops (Idefics3 / SmolVLM: "
                              "do_image_splitting=False)")
        return PatchLayout((side, side), merge)
    grid_thw = batch.get("image_grid_thw")
    if grid_thw is None:
        raise ConfigError(f"a {info.family} batch needs image_grid_thw to place image tokens on the patch grid")
    if (grid_thw != grid_thw[0]).any() or int(grid_thw[0, 0]) != 1:
        raise ConfigError(f"image_grid_thw={grid_thw.tolist()}: heatmaps need one still image (t=1) per example, "
                          "all of one size; resize the images to one size")
    grid, merge = (int(grid_thw[0, 1]), int(grid_thw[0, 2])), int(vision.spatial_merge_size)
    return PatchLayout(grid, 1, block=merge) if tower else PatchLayout(grid, merge)


def patch_grid(acts: Tensor, layout: PatchLayout) -> Tensor:
    """``(..., n_tokens)`` activations at image tokens, in stream order -> ``(..., rows, cols)`` per patch.

    A merged token's value fills its ``merge x merge`` block (Qwen-VL's spatial merge).

    Raises:
        ConfigError: ``n_tokens`` does not tile the layout's grid.
    """
    if acts.shape[-1] != layout.n_tokens:
        raise ConfigError(f"{acts.shape[-1]} image tokens do not tile a {layout.grid} patch grid merged "
                          f"{layout.merge}x{layout.merge} ({layout.n_tokens} tokens)")
    rows, block = layout.grid[0] // layout.merge, layout.block
    if block > 1:  # block x block groups of tokens, row-major inside each group, the groups row-major
        acts = rearrange(acts, "... (br bc ir ic) -> ... (br ir bc ic)", br=rows // block, ir=block, ic=block)
    # stream order is now row-major over merged tokens; each covers merge x merge patches
    return repeat(acts, "... (rows cols) -> ... (rows mr) (cols mc)", rows=rows, mr=layout.merge, mc=layout.merge)


MAX_TOP_BYTES = 4 * 2**30
"""What :func:`scan` may keep of top examples (activations at image tokens, token windows) by default: 4 GiB."""


@dataclass
class TopExamples:
    """For each latent, the ``n_examples`` examples where it peaks highest, best first (``n = n_examples``)."""

    latents: Tensor
    """``(F,)`` the SAE latent of each row."""
    values: Tensor
    """``(F, n)`` the example's peak activation; ``-inf`` where fewer than ``n`` examples were seen."""
    example: Tensor
    """``(F, n)`` index of the example in the data (batches concatenated in order); -1 where empty."""
    position: Tensor
    """``(F, n)`` sequence position of the peak."""
    tokens: Tensor
    """``(F, n, 2c+1)`` token ids around the peak (the peak in the middle); -1 outside the sequence or on padding."""
    token_acts: Tensor
    """``(F, n, 2c+1)`` the latent's activation at those tokens."""
    image_acts: Tensor | None
    """``(F, n, image tokens)`` the latent's activation at each image token, in stream order (one value per
    merged token: a quarter of the patches for Qwen-VL); ``None`` without image tokens. :meth:`heatmap` maps
    them onto the patch grid."""
    layout: PatchLayout | None

    def heatmap(self, row: int) -> Tensor | None:
        """``(n, rows, cols)``: the activation on each image patch of row ``row``'s examples (``None`` without
        image tokens); built on demand, so that a scan keeps one value per image token, not per patch."""
        return None if self.image_acts is None else patch_grid(self.image_acts[row], self.layout)

    @property
    def heat(self) -> Tensor | None:
        """``(F, n, rows, cols)``: :meth:`heatmap` of every row at once (as big as the patch grid: prefer heatmap)."""
        return None if self.image_acts is None else patch_grid(self.image_acts, self.layout)

    @property
    def features(self) -> Tensor:
        """Deprecated name of :attr:`latents`."""
        warn_renamed("TopExamples.features", "TopExamples.latents")
        return self.latents

    def row(self, latent: int) -> int:
        """Row of ``latent`` in these tensors.

        Raises:
            ConfigError: ``latent`` was not scanned.
        """
        hits = (self.latents == latent).nonzero()
        if len(hits) == 0:
            raise ConfigError(f"latent {latent} was not scanned; scanned latents include "
                              f"{self.latents[:10].tolist()} (pass latents= to scan())")
        return int(hits[0, 0])


@dataclass
class Scan:
    """What one :func:`scan` pass measured: per-latent sums and the top examples."""

    tokens: int
    """Positions read (selected by ``where``)."""
    fired: Tensor
    """``(d_sae,)`` positions where each latent fired (> 0)."""
    fired_image: Tensor
    """``(d_sae,)`` of those, image-token positions."""
    total: Tensor
    """``(d_sae,)`` sum of activations."""
    max: Tensor
    """``(d_sae,)`` largest activation (0 if never fired)."""
    l0_counts: Tensor
    """``(len(Kind), d_sae + 1)`` positions of each token kind with each L0 (active latents at the position),
    counted over every non-pad position, whatever ``where`` read."""
    top: TopExamples
    peaks: Tensor | None = None
    """``(F, n_examples)`` each example's largest activation of each scanned latent (rows as ``top.latents``,
    0 where it did not fire), with ``scan(..., peaks=True)``; None otherwise. :func:`vlmsae.explain` picks
    firing and non-firing examples from it."""

    @property
    def density(self) -> Tensor:
        """``(d_sae,)`` float64 fraction of the positions read where each latent fired."""
        return self.fired.double() / max(self.tokens, 1)


def _window(ids: Tensor, kinds: Tensor, latents: Tensor, position: Tensor, context: int):
    """Ids ``(B, F, W)`` and activations ``(B, F, W)`` of the ``W = 2c+1`` positions around each peak."""
    batch, seq = ids.shape
    offsets = torch.arange(-context, context + 1, device=position.device)
    at = position[..., None] + offsets  # (B, F, W)
    inside = (at >= 0) & (at < seq)
    at = at.clamp(0, seq - 1)
    rows = torch.arange(batch, device=ids.device)[:, None, None]
    tok = ids[rows, at]
    tok = torch.where(inside & (kinds[rows, at] != Kind.PAD), tok, -1)
    f = torch.arange(latents.shape[-1], device=latents.device)[None, :, None]
    acts = latents[rows, at, f]
    return tok, torch.where(inside, acts, torch.zeros((), dtype=acts.dtype, device=acts.device))


def _merge_top(top: tuple[Tensor, ...], new: tuple[Tensor, ...], n: int) -> tuple[Tensor, ...]:
    """Keep the ``n`` best of the old rows and a batch's candidates; every tensor is ``(F, n, ...)``, values first."""
    cand = [torch.cat([old, fresh], 1) for old, fresh in zip(top, new)]
    best = cand[0].topk(min(n, cand[0].shape[1]), dim=1).indices  # sorted, best first
    out = []
    for t in cand:
        index = best.reshape(*best.shape, *([1] * (t.ndim - 2))).expand(-1, -1, *t.shape[2:])
        out.append(t.gather(1, index))
    return tuple(out)


@renamed_kwargs(k="n_examples", features="latents")
@torch.no_grad()
def scan(model: Model, layer: int, sae: SAE, data: Iterable[dict], *, n_examples: int = 8,
         latents: Iterable[int] | None = None, where: Where = DEFAULT_WHERE, context: int = 4,
         site: str = "resid_post", special_ids: Iterable[int] | None = None,
         max_top_bytes: int = MAX_TOP_BYTES, peaks: bool = False) -> Scan:
    """One pass over ``data`` (batches of model inputs): latent statistics and each latent's top ``n_examples``.

    ``latents`` limits the top examples (not the statistics) to some latents: their memory is
    ``F x n_examples x (image tokens + 2 context + 1)`` values on the SAE's device (twice that while a
    batch is merged in), which for a large SAE on a model with hundreds of image tokens is worth
    limiting; beyond ``max_top_bytes`` scan stops at the first batch and says what to pass. ``where``
    chooses the positions read (kind names as in :func:`vlmsae.steer`); ``special_ids`` are token ids
    counted as SPECIAL besides the config's (a chat template's control tokens:
    :func:`vlmsae.special_token_ids` with the tokenizer), so the default ``where`` leaves them out.
    ``peaks=True`` also keeps every example's largest activation of each scanned latent (``Scan.peaks``,
    ``F x examples`` values on the CPU).
    Examples are numbered across batches in order. Activations are in the SAE's latent units; counts
    in positions. At a vision tower's site (``"vision.blocks.3.hook_resid_post"``) an example is one image of the
    tower's batch, its positions are patches (token ids -1; the class token is SPECIAL, so left out by default),
    and every top example has a heatmap on the patch grid (:func:`patch_layout`); at ``vision.proj_out`` the
    positions are the image tokens the decoder receives.

    Raises:
        ConfigError: ``n_examples < 1``, ``context < 0``, a bad latent index, ``data`` yields nothing,
            the SAE's ``d_in`` is not the site's width, the top examples would exceed
            ``max_top_bytes``, or (models with image tokens) an example without exactly one image, or
            images of several sizes.
        LayerIndexError, SiteError, UnsupportedModelError: as :func:`vlmsae.record`.

    Warns:
        HookNameWarning: the SAE's ``hook_name`` metadata names another site.
    """
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise ConfigError(f"n_examples={n_examples!r} must be an integer >= 1 (examples kept per latent)")
    if context < 0:
        raise ConfigError(f"context={context} must be >= 0 (tokens shown either side of the peak)")
    info, layer, site = check_entry(model, layer, site, sae)
    kinds_read = where_kinds(where, info, site)
    heatmaps = site in ("vision.resid_pre", "vision.resid_post", "vision.proj_out") or \
        (stream_of(site) == "decoder" and info.has_image_tokens)  # patch_layout says where
    device = sae.W_dec.device
    d_sae = sae.cfg.d_sae
    subset = None if latents is None else torch.tensor(check_latents(latents, d_sae), dtype=torch.long,
                                                       device=device)
    feats = subset if subset is not None else torch.arange(d_sae, device=device)
    n_feat = len(feats)
    zeros = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    fired, fired_image, total = zeros(d_sae, dtype=torch.long), zeros(d_sae, dtype=torch.long), zeros(d_sae)
    peak_max, tokens = zeros(d_sae), zeros((), dtype=torch.long)
    l0_counts = zeros(len(Kind), d_sae + 1, dtype=torch.long)
    top: tuple[Tensor, ...] | None = None
    layout, offset, peak_rows = None, 0, []
    for batch in tqdm(data, desc="scan", leave=False):
        with record(model, [layer], site=site, stop=True, special_ids=special_ids) as rec:
            model(**batch)
        fwd = rec.forwards[0]
        kinds = rec.kinds(layer).to(device)
        read = where_mask(where, kinds_read, fwd).to(device)  # (B, T)
        codes = sae.encode(rec[layer].to(device), kinds).float()  # (B, T, d_sae)
        active = codes > 0
        chosen = codes[read]  # (N, d_sae)
        tokens += read.sum()
        fired += active[read].sum(0)
        fired_image += active[read & (kinds == Kind.IMAGE)].sum(0)
        total += chosen.sum(0)
        if chosen.shape[0]:
            peak_max = torch.maximum(peak_max, chosen.amax(0))
        content = kinds != Kind.PAD
        l0_counts.index_put_((kinds[content].long(), active.sum(-1)[content]),
                             torch.ones((), dtype=torch.long, device=device), accumulate=True)

        acts = codes if subset is None else codes[..., subset]  # (B, T, F)
        n_batch = acts.shape[0]
        peak, position = acts.masked_fill(~read[..., None], float("-inf")).max(1)  # (B, F)
        ids = fwd.ids.to(device) if fwd.ids is not None else torch.full(kinds.shape, -1, device=device)  # a tower's patches
        ids, window_acts = _window(ids, kinds, acts, position, context)
        if peaks:
            peak_rows.append(peak.T.clamp_min(0).cpu())  # (F, B); -inf (no position read) -> 0
        example = torch.arange(offset, offset + n_batch, device=device)[None, :].expand(n_feat, -1)
        new = [peak.T, example, position.T, ids.transpose(0, 1), window_acts.transpose(0, 1)]
        if heatmaps:
            layout = _check_layout(layout, patch_layout(model, batch, site))
            image = kinds == Kind.IMAGE
            counts = image.sum(1)
            if not bool((counts == layout.n_tokens).all()):
                raise ConfigError(f"image tokens per example {counts.tolist()}; heatmaps need exactly one image of "
                                  f"{layout.n_tokens} tokens per example")
            new.append(acts[image].reshape(n_batch, layout.n_tokens, n_feat).permute(2, 0, 1))  # (F, B, tokens)
        if top is None:
            _check_top_bytes(new, n_examples, max_top_bytes, device)
            top = tuple(t[:, :0] for t in new)
        top = _merge_top(top, tuple(new), n_examples)
        offset += n_batch
    if top is None:
        raise ConfigError("scan() got no batches: data yielded nothing")
    values, example, position, ids, window_acts, *heat = top
    missing = n_examples - values.shape[1]
    if missing:  # fewer examples than n_examples in the whole dataset
        pad = lambda t, v: torch.cat([t, t.new_full((n_feat, missing, *t.shape[2:]), v)], 1)  # noqa: E731
        values, example, position = pad(values, float("-inf")), pad(example, -1), pad(position, -1)
        ids, window_acts = pad(ids, -1), pad(window_acts, 0.0)
        heat = [pad(h, 0.0) for h in heat]
    example = torch.where(torch.isinf(values), -1, example)
    found = TopExamples(latents=feats, values=values, example=example, position=position, tokens=ids,
                        token_acts=window_acts, image_acts=heat[0] if heat else None, layout=layout)
    return Scan(tokens=int(tokens), fired=fired, fired_image=fired_image, total=total, max=peak_max,
                l0_counts=l0_counts, top=found, peaks=torch.cat(peak_rows, 1) if peaks else None)


def _check_top_bytes(first: list[Tensor], n_examples: int, limit: int, device) -> None:
    """Raises ``ConfigError`` when the top examples, ``(F, n_examples + batch, ...)`` while a batch is merged in,
    would take more than ``limit`` bytes; ``first``: the first batch's candidates ``(F, batch, ...)``."""
    batch = first[0].shape[1]
    per_example = sum(t[:, :1].numel() * t.element_size() for t in first)
    need = per_example * (n_examples + batch)
    if need > limit:
        n_feat = first[0].shape[0]
        fits = max(1, n_feat * limit // need)
        raise ConfigError(f"scan would keep {need / 2**20:,.1f} MiB of top examples on {device} ({n_feat} latents x "
                          f"{n_examples} examples, {per_example // max(n_feat, 1)} bytes each, plus a batch of {batch}); "
                          f"pass latents= (about {fits} of them fit), a smaller n_examples, or max_top_bytes=")


def _check_layout(seen: PatchLayout | None, layout: PatchLayout) -> PatchLayout:
    if seen is not None and seen != layout:
        raise ConfigError(f"images change patch layout between batches ({seen} then {layout}); heatmaps need one "
                          "image size throughout: resize the images to one size")
    return layout


def _token_text(tokenizer, ids: Iterable[int]) -> list[str]:
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [str(i) for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]


def latent_table(scan: Scan, *, tokenizer=None, aurocs: pd.DataFrame | None = None, dense: float = 0.1,
                 top_tokens: int = 3) -> pd.DataFrame:
    """``(d_sae,)`` rows, one per latent: firing density, mean and max activation, image / text share, top tokens, flags.

    ``top_tokens``: the commonest tokens at the peak of the latent's top examples (``<image>``
    where it peaks on image tokens), decoded with ``tokenizer`` if given. ``aurocs``: a concept x
    latent table (:func:`concept_aurocs`) adds the concept each latent detects best (``color=red``)
    and its AUROC. ``dead``: never fired on the scanned positions (a window of ``scan.tokens`` tokens);
    ``dense``: fired on more than ``dense`` of them. Densities are fractions of positions read;
    ``mean`` / ``mean_firing`` / ``max`` are activations in latent units.
    """
    fired = scan.fired.double().cpu()
    n = max(scan.tokens, 1)
    density = scan.density.cpu()
    safe = fired.clamp_min(1)
    table = pd.DataFrame({
        "density": density.numpy(),
        "log10_density": torch.where(fired > 0, density.clamp_min(1e-30).log10(), float("-inf")).numpy(),
        "mean": (scan.total.double().cpu() / n).numpy(),
        "mean_firing": (scan.total.double().cpu() / safe).numpy(),
        "max": scan.max.double().cpu().numpy(),
        "image_fraction": (scan.fired_image.double().cpu() / safe).numpy(),
        "text_fraction": ((fired - scan.fired_image.double().cpu()) / safe).numpy(),
        "dead": (fired == 0).numpy(),
        "dense": (density > dense).numpy(),
    })
    table.index.name = "latent"
    top = scan.top
    middle = top.tokens.shape[2] // 2
    words = [""] * len(table)
    peaks = top.tokens[:, :, middle].cpu()
    hit = (top.values > 0).cpu()
    for row, latent in enumerate(top.latents.tolist()):
        common = Counter(peaks[row][hit[row]].tolist()).most_common(top_tokens)
        words[latent] = " ".join(_token_text(tokenizer, [t for t, _ in common]))
    table["top_tokens"] = words
    if aurocs is not None:
        names = ["=".join(map(str, key)) if isinstance(key, tuple) else str(key) for key in aurocs.index]
        best = aurocs.to_numpy().argmax(0)
        table["concept"] = pd.Series([names[i] for i in best], index=aurocs.columns).reindex(table.index)
        table["concept_auroc"] = pd.Series(aurocs.to_numpy().max(0), index=aurocs.columns).reindex(table.index)
    return table


def concept_aurocs(latents: Tensor, values: pd.Series, groups: pd.Series | None = None) -> pd.DataFrame:
    """AUROC of every latent (columns) at detecting every concept value (rows), from ``latents`` ``(n, d_sae)``.

    ``values`` ``(n,)`` names each row's value (``red``); ``groups`` ``(n,)`` its concept (``color``):
    a value's rows are scored against the other rows of its group, so red is told from the other
    colours. Rows are ``(group, value)``; without ``groups`` every row is in one group ``all``.
    AUROC ties count half (Mann-Whitney); 0.5 is chance.

    Raises:
        ConfigError: ``values`` or ``groups`` do not have one entry per row of ``latents``.
    """
    values = pd.Series(values).reset_index(drop=True)
    groups = pd.Series(["all"] * len(values)) if groups is None else pd.Series(groups).reset_index(drop=True)
    if len(values) != latents.shape[0] or len(groups) != len(values):
        raise ConfigError(f"{latents.shape[0]} rows of latents, {len(values)} values and {len(groups)} groups; "
                          "give one value and group per row")
    rows = {}
    for group in groups.unique():
        inside = (groups == group).to_numpy(copy=True)
        for value in sorted(values[inside].unique()):
            positive = (values[inside] == value).to_numpy(copy=True)
            if positive.all():
                continue  # nothing to tell it from
            chosen = latents[torch.from_numpy(inside)]
            positive = torch.from_numpy(positive)
            rows[(group, value)] = auroc(chosen[positive], chosen[~positive]).cpu().numpy()
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["concept", "value"])
    table.columns.name = "latent"
    return table


@dataclass
class ImageQuestionGrid:
    """A latent's activation for every (image, question) pair."""

    values: Tensor
    """``(F, n_images, n_questions)``."""
    latents: list[int]
    questions: list[str]

    @property
    def features(self) -> list[int]:
        """Deprecated name of :attr:`latents`."""
        warn_renamed("ImageQuestionGrid.features", "ImageQuestionGrid.latents")
        return self.latents

    def dependence(self) -> pd.DataFrame:
        """Per latent, the share of its variance over the grid explained by the image, the question, and neither.

        The two-way decomposition ``v = mean + a_image + b_question + interaction``: a latent
        that reads the image has ``image_share`` near 1, one that reads the question ``question_share``.
        """
        v = self.values.double()
        grand = v.mean((1, 2), keepdim=True)
        by_image = v.mean(2, keepdim=True) - grand
        by_question = v.mean(1, keepdim=True) - grand
        rest = v - grand - by_image - by_question
        total = (v - grand).pow(2).sum((1, 2))
        share = lambda part: (part.expand_as(v).pow(2).sum((1, 2)) / total).numpy()  # noqa: E731
        table = pd.DataFrame({"mean": grand.flatten().numpy(), "image_share": share(by_image),
                              "question_share": share(by_question), "interaction_share": share(rest)},
                             index=pd.Index(self.latents, name="latent"))
        return table


@renamed_kwargs(features="latents")
@torch.no_grad()
def image_question_grid(model: Model, layer: int, sae: SAE, images: Sequence, questions: Sequence[str],
                        inputs: Callable[[Sequence, str], dict], *, latents: Iterable[int], where: Where = "text",
                        reduce: str = "max", batch_size: int = 64, site: str = "resid_post",
                        special_ids: Iterable[int] | None = None) -> ImageQuestionGrid:
    """Record ``latents`` for every pair of ``images`` and ``questions``.

    ``inputs(images, question)`` builds one batch of model inputs asking ``question`` about each
    image (e.g. ``lambda s, q: shapes.qa_inputs(s, tokenizer, q, labels=False)``). Each pair's
    value is the latent's ``reduce`` (``max``, ``mean``, or ``last``: the last selected position,
    which predicts the answer) over the ``where`` positions. ``values`` is ``(F, n_images, n_questions)``.
    ``special_ids`` as in :func:`scan`.

    Raises:
        ConfigError: an unknown ``reduce``, no latents or a bad index, a question whose ``where`` selects
            no position in some example, or the SAE's ``d_in`` is not the model's ``d_model``.
        LayerIndexError, SiteError, UnsupportedModelError: as :func:`vlmsae.record`.
    """
    if reduce not in ("max", "mean", "last"):
        raise ConfigError(f"reduce={reduce!r} is unknown; use 'max', 'mean' or 'last'")
    info, layer, site = check_entry(model, layer, site, sae)
    kinds_read = where_kinds(where, info)
    device = sae.W_dec.device
    index = torch.tensor(check_latents(latents, sae.cfg.d_sae), dtype=torch.long, device=device)
    if len(index) == 0:
        raise ConfigError("latents=[] records nothing; pass the latents to put on the grid")
    columns = []
    for question in tqdm(questions, desc="image x question", leave=False):
        column = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            with record(model, [layer], site=site, stop=True, special_ids=special_ids) as rec:
                model(**inputs(chunk, question))
            read = where_mask(where, kinds_read, rec.forwards[0]).to(device)  # (B, T)
            if not bool(read.any(1).all()):
                raise ConfigError(f"where={where!r} selects no position in some examples of question {question!r}")
            acts = sae.encode(rec[layer].to(device), rec.kinds(layer)).float()[..., index]  # (B, T, F)
            if reduce == "max":
                value = acts.masked_fill(~read[..., None], float("-inf")).amax(1)
            elif reduce == "mean":
                value = (acts * read[..., None]).sum(1) / read.sum(1, keepdim=True)
            else:
                last = (read * torch.arange(1, read.shape[1] + 1, device=device)).argmax(1)
                value = acts[torch.arange(acts.shape[0], device=device), last]
            column.append(value)  # (B, F)
        columns.append(torch.cat(column))  # (n_images, F)
    values = torch.stack(columns, -1).transpose(0, 1).cpu()  # (F, n_images, n_questions)
    return ImageQuestionGrid(values, index.tolist(), list(questions))


__getattr__ = renamed_attributes(__name__, {"feature_table": "latent_table"}, globals())
