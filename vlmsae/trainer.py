"""One SAE training step (loss, backward, Adam, decoder renorm), fast and free of host syncs.

TopK kinds take the sparse path: one dense matmul scores every latent
(in bf16 on CUDA and on CPUs with native bf16 dot products, `default_compute_dtype`;
the chosen latents' values are then recomputed in float32), TopK picks k per token, and decoding plus every gradient
touch only the chosen rows (`vlmsae.sparse`). ReLU and JumpReLU latents are
not sparse enough early in training for that to pay, so they take the dense
path under autocast. Metrics accumulate on the device; every `sync_every`
steps one readout moves them to the host, appends them to `history`, and
stores the latents dead at that moment: AuxK's candidates until the next one.

AuxK (Gao et al. 2024 §A.2) models the residual with the top `aux_k`
pre-activations among dead latents. Its latents are the candidates of the last
readout that are still dead now (a device mask, no sync); a latent that dies
between two readouts joins at the next one, `sync_every` steps later, which is
negligible against a dead window of millions of tokens. Knowing the candidates
on the host lets the pass be dense, one matmul over the candidates' encoder
columns and one over their decoder rows, when there are few enough of them
(`DENSE_AUXK_FACTOR`); otherwise it takes the sparse kernels at `aux_k`
entries per token.

An SAE stored in float16 or bfloat16 trains a float32 copy (master weights:
Adam updates smaller than a half-precision step would round away, and CPU
kernels lack half types) that is written back, rounded, after every step.
A step enables autograd itself, so it trains under `torch.no_grad()` too.
"""

import contextlib
import copy
import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from vlmsae import metrics
from vlmsae.deprecation import renamed_attributes
from vlmsae.distributed import World
from vlmsae.errors import ConfigError, NonFiniteError
from vlmsae.sae import DTYPES, SAE
from vlmsae.sparse import SparseCode, entry_dots, gather_pre_acts, sparse_decode


SYNC_EVERY = 100
"""Readout cadence of an SAETrainer whose config leaves ``sync_every`` unset (``vlmsae.train`` uses its own)."""

DENSE_AUXK_FACTOR = {"cpu": 8.0, "cuda": 32.0}
"""AuxK runs dense while its candidates number at most this many times aux_k, per device type (others: cpu's).

The sparse pass gathers aux_k rows of d_in per token in each of its kernels (memory-bound); the dense
one does six matmuls over the candidates' columns (compute-bound), so its cost grows with their number.
Measured with benchmarks/bench_auxk.py (benchmarks/RESULTS.md, "Dense vs sparse AuxK"):
cpu: 2 shared x86 cores, fp32, d_in 768, d_sae 24576, k 32, batch 4096, aux_k 384: dense / sparse AuxK
time 0.27 at 1x aux_k candidates, 0.60 at 2.6x, 0.99 at 7.8x, 1.10 at 15.6x.
cuda: H200, bf16 matmuls, d_in 4096, d_sae 65536, k 64, batch 16384, aux_k 2048: 0.005 at 1x, 0.01 at 4x,
0.02 at 8x, 0.03 at 16x (49 ms against 1619 ms). Dense wins far beyond 32x there, but its
(n_tokens, n_candidates) activations grow with the candidates; at 32x they are the size of the
(n_tokens, d_sae) block of that run's selection, and above it the sparse pass (aux_k per token) bounds memory.
"""


TOPK_SAMPLE = 1 << 16
"""Entries sampled to bound BatchTopK's threshold before its topk on CPU (see ``_largest_entries``)."""


@dataclass
class SAETrainerConfig:
    """How an :class:`SAETrainer` steps: the optimiser, the readout cadence, the precision of the selection.

    The one owner of the learning rate and of the readout cadence, for a lone trainer and for
    ``vlmsae.train`` alike; the loss recipe lives in SAEConfig. Raises ``ConfigError`` for a bad value.
    """

    lr: float | None = None
    """Adam learning rate; None means 2e-4 / sqrt(d_sae / 2**14), the scaling of Gao et al. 2024."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 6.25e-10
    """Adam epsilon (Gao et al. 2024)."""
    sync_every: int | None = None
    """Steps between the host readouts of metrics and of the dead-latent count; None means 100 for a lone
    SAETrainer (``SYNC_EVERY``) and 25 under ``vlmsae.train`` (``vlmsae.train.RUN_SYNC_EVERY``)."""
    compute_dtype: str | None = None
    """dtype of the selection matmul (the chosen latents' values are always recomputed in the weights' dtype);
    None means ``default_compute_dtype``: bfloat16 for float32 weights on CUDA and on a CPU with native bf16
    dot products (AVX512-BF16 or AMX), else the weights' dtype. "float32" gives a CPU run that does not depend
    on the machine's instruction set."""
    encode_chunk: int | None = None
    """Tokens per chunk of the selection matmul; None means 256 on CPU (so that a chunk of pre-activations stays in cache) and the whole batch on CUDA."""
    init_from_first_batch: bool = True
    """Set b_dec and the input scale from the first batch (turn off when resuming a trained SAE)."""
    dense_auxk_factor: float | None = None
    """AuxK runs dense while its candidate latents number at most this times aux_k (0: always sparse, inf:
    always dense); None means ``DENSE_AUXK_FACTOR`` of the device type."""

    def __post_init__(self):
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ConfigError(f"lr={self.lr!r} must be in (0, 1)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas={self.betas!r} must be two numbers in [0, 1)")
        if not self.eps > 0:
            raise ConfigError(f"eps={self.eps!r} must be > 0")
        if self.sync_every is not None and (isinstance(self.sync_every, bool) or not isinstance(self.sync_every, int)
                                            or self.sync_every < 1):
            raise ConfigError(f"sync_every={self.sync_every!r} must be None or an integer >= 1")
        if self.compute_dtype is not None and self.compute_dtype not in DTYPES:
            raise ConfigError(f"compute_dtype={self.compute_dtype!r} must be None or one of {', '.join(DTYPES)}")
        if self.encode_chunk is not None and (not isinstance(self.encode_chunk, int) or self.encode_chunk < 1):
            raise ConfigError(f"encode_chunk={self.encode_chunk!r} must be None or an integer >= 1")
        if self.dense_auxk_factor is not None and not (isinstance(self.dense_auxk_factor, (int, float))
                                                        and self.dense_auxk_factor >= 0):
            raise ConfigError(f"dense_auxk_factor={self.dense_auxk_factor!r} must be None or a number >= 0")


@dataclass
class TrainMetrics:
    """Averages over the steps since the previous readout (mse in the model's units)."""

    step: int
    tokens: int
    loss: float
    mse: float
    fvu: float
    l0: float
    aux_loss: float
    dead_fraction: float
    """Latents that fired on none of the last ``dead_window`` training tokens (the one definition of dead)."""
    dense_fraction: float
    dead_window: int | None = None
    """Tokens: ``min(dead_tokens, tokens)``, the SAE config's window, or every token so far while the run is shorter
    (so a short run reports the latents that never fired, not 0). None in histories from before vlmsae 0.2."""


class Selection(NamedTuple):
    """The latents a sparse step trains: the TopK / BatchTopK picks, and the AuxK picks among dead latents."""

    code: SparseCode
    """The main picks: N entries grouped by token, with the latent order their gradients need."""
    values: Tensor
    """(N,) pre-activations at `code`'s entries."""
    aux_values: Tensor
    """(n_tokens, aux_k) pre-activations of the sparse AuxK picks (-inf where fewer latents are dead than aux_k)."""
    aux_latents: Tensor
    """(n_tokens, aux_k) their latents, ascending per token; aux_k is 0 when AuxK is off or runs dense."""


class StepLoss(NamedTuple):
    """One loss pass: what the backward pass and the metric window need."""

    loss: Tensor
    """() the loss that is backpropagated: reconstruction MSE plus the sparsity or AuxK term."""
    recon: Tensor
    """(n_tokens, d_in) reconstruction, in the SAE's normalised units."""
    nonzero: Tensor
    """() non-zero latents over the batch."""
    fired: Tensor
    """(d_sae,) long: tokens of the batch on which each latent fired."""
    aux_loss: Tensor
    """() AuxK loss before its coefficient (0 when there is none)."""


class WindowSums(NamedTuple):
    """Sums over the steps of a metric window: float64 tensors on the device, floats once read out."""

    loss: Tensor | float
    squared_error: Tensor | float
    """In the model's units (the input scale divided out)."""
    total_variance: Tensor | float
    """In the model's units."""
    nonzero: Tensor | float
    aux_loss: Tensor | float


@dataclass
class MetricWindow:
    """What accumulates on the device between two readouts: one add per step, read in one sync."""

    sums: Tensor
    """(5,) float64: the fields of WindowSums, in order."""
    fire_count: Tensor
    """(d_sae,) long: tokens of the window on which each latent fired."""
    start: int = 0
    """The trainer's step count when the window opened."""
    tokens: int = 0
    """Tokens seen in the window."""

    def add(self, sums: WindowSums, fired: Tensor) -> None:
        """Add one step's sums and fire counts (no host sync)."""
        self.sums += torch.stack(list(sums))
        self.fire_count += fired

    def reset(self, step: int) -> None:
        """Open a new window at `step`."""
        self.sums.zero_()
        self.fire_count.zero_()
        self.start, self.tokens = step, 0


class SAETrainer:
    """Trains `sae` one batch of activations at a time: `trainer.step(x)` with x (..., d_in).

    A step is a selection (TopK, Gao et al. 2024; BatchTopK, Bussmann et al. 2024), a loss pass
    (sparse for those kinds, dense for ReLU and JumpReLU), a backward pass and an Adam step; the
    metrics go to a :class:`MetricWindow` and are read out every `sync_every` steps into `history`.
    With ``world`` (a :class:`vlmsae.distributed.World`, one trainer per rank) each rank steps on its own
    rows and the step is that of one process on every rank's rows concatenated in rank order: global
    token count, gradients, dead-latent counters, metrics, first-batch init and BatchTopK selection.
    Raises ``ConfigError`` for bad settings, ``NonFiniteError`` at a readout whose loss is NaN/Inf.
    """

    def __init__(self, sae: SAE, cfg: SAETrainerConfig | None = None, *, world: World | None = None, **fields):
        if cfg is None:
            cfg = SAETrainerConfig(**fields)
        elif fields:
            raise ConfigError(f"pass either an SAETrainerConfig or its fields, not both (got cfg and {sorted(fields)})")
        if sae.is_transcoder:
            raise ConfigError("SAETrainer trains SAEs, which reconstruct what they read; a transcoder predicts another "
                              "site, which vlmsae does not train: train it with SAELens and open it with Transcoder.load")
        self.stored = sae  # the caller's SAE, in its own dtype: `step` writes the trained weights back to it
        if sae.W_dec.dtype in (torch.float16, torch.bfloat16):
            sae = copy.deepcopy(sae).float()
            sae.cfg = self.stored.cfg  # one config for the stored SAE and its float32 working copy
        self.sae, self.cfg, self.world = sae, cfg, world
        self.sync_every = cfg.sync_every or SYNC_EVERY
        device = sae.W_dec.device
        self.compute_dtype = (DTYPES[cfg.compute_dtype] if cfg.compute_dtype
                              else default_compute_dtype(sae.W_dec, sae.cfg.architecture))
        self.encode_chunk = cfg.encode_chunk or (256 if device.type == "cpu" else 1 << 62)
        self.dense_auxk_factor = (cfg.dense_auxk_factor if cfg.dense_auxk_factor is not None
                                  else DENSE_AUXK_FACTOR.get(device.type, DENSE_AUXK_FACTOR["cpu"]))
        lr = cfg.lr if cfg.lr is not None else 2e-4 / math.sqrt(sae.cfg.d_sae / 2**14)
        options = dict(lr=lr, betas=cfg.betas, eps=cfg.eps)
        # Fused Adam copies a non-contiguous parameter twice per step. W_enc is
        # the transpose of a contiguous [d_sae, d_in] block (see SAE.__init__),
        # so Adam updates that block, through a storage-sharing alias.
        self.W_encT = sae.W_enc.detach().T
        params = [p for name, p in sae.named_parameters() if name != "W_enc"] + [self.W_encT]
        try:
            self.optimizer = torch.optim.Adam(params, fused=True, **options)
        except RuntimeError:  # fused Adam is missing for some device / dtype pairs
            self.optimizer = torch.optim.Adam(params, foreach=True, **options)
        d_sae = sae.cfg.d_sae
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.window = MetricWindow(sums=torch.zeros(len(WindowSums._fields), dtype=torch.float64, device=device),
                                   fire_count=torch.zeros(d_sae, dtype=torch.long, device=device))
        self.n_steps = 0
        self.n_tokens = 0
        self.history: list[TrainMetrics] = []
        # (n_candidates,) long, ascending: the latents dead at the last readout, AuxK's candidates (Gao et al. 2024 §A.2)
        self.aux_candidates = torch.zeros(0, dtype=torch.long, device=device)
        self.dead_window = sae.cfg.dead_tokens  # tokens; set at each readout to min(dead_tokens, tokens)
        self.initialized = not cfg.init_from_first_batch
        # Under N ranks: global tokens of the steps since the last readout, on the device (no host sync per step).
        self.pending_tokens = torch.zeros((), dtype=torch.long, device=device)

    def step(self, x: Tensor, k: int | None = None, kinds: Tensor | None = None) -> None:
        """One optimiser step on `x` (..., d_in); no host synchronisation except the readout every `sync_every` steps.

        `k` (TopK kinds): the sparsity of this step, e.g. annealed by `vlmsae.train`; None: the SAE's own k.
        `kinds` (...): the `vlmsae.Kind` of each row, which an SAE with ``normalize_per_kind`` or ``k_per_kind``
        needs (ConfigError without) and which the others ignore; its loss is then in the per-kind normalised units, its readouts
        (mse, fvu) in the model's units as always. The SAE's config is never changed.
        """
        sae = self.sae
        x = x.reshape(-1, sae.cfg.d_in).to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
        kinds = kinds.reshape(-1).to(x.device) if sae.cfg.reads_kinds and kinds is not None else None
        world = self.world
        if not self.initialized:  # under N ranks: from the global first batch, in rank order
            if world is None:
                sae.init_from_batch(x, kinds)
            else:
                sae.init_from_batch(world.gather_rows(x),
                                    world.gather_rows(kinds.unsqueeze(1)).view(-1) if kinds is not None else None)
            self.initialized = True
        sae.train()
        self.stored.train()
        kind = sae.cfg.architecture
        # Under a caller's no_grad (a notebook, a benchmark) the SAE still needs its graph.
        with torch.enable_grad():
            out = self._loss(x, k, kinds)
            sae.zero_grad(set_to_none=True)
            out.loss.backward()
        if world is not None:
            self.pending_tokens += self._reduce_step(x, out, kinds)
        if sae.unit_norm_decoder:
            sae.remove_parallel_decoder_grad_()
        self.W_encT.grad = sae.W_enc.grad.T
        self.optimizer.step()
        self.W_encT.grad = None
        with torch.no_grad():
            if sae.unit_norm_decoder:
                sae.normalize_decoder_()
            if kind == "jumprelu":
                sae.threshold.clamp_(min=0)
            if world is None:
                self._count(x, out, kinds)
        self._store()
        self.n_steps += 1
        if world is None:
            self.n_tokens += x.shape[0]
            self.window.tokens += x.shape[0]
        if self.n_steps % self.sync_every == 0:
            self.history.append(self.read_metrics())

    def _loss(self, x: Tensor, k: int | None, kinds: Tensor | None = None) -> StepLoss:
        """This step's loss on `x` (n_tokens, d_in) of `kinds` (n_tokens,) (None unless the SAE reads kinds:
        ``normalize_per_kind``, ``k_per_kind``): the sparse pass for the TopK kinds, the dense one for the others."""
        if self.sae.cfg.architecture in ("topk", "batchtopk"):
            return self._sparse_loss(x, k, kinds)
        return self._dense_loss(x, kinds)

    @torch.no_grad()
    def _store(self) -> None:
        """Write the float32 working copy back into a half-precision SAE (rounded; no host sync)."""
        if self.stored is not self.sae:
            stored = self.stored.state_dict()
            for name, value in self.sae.state_dict().items():
                stored[name].copy_(value)

    def _encoder_chunks(self, u: Tensor):
        """No-grad dense pass over the encoder: yields (start, stop, pre-activations of those tokens)."""
        sae = self.sae
        W_encT = sae.W_enc.T.to(self.compute_dtype)  # (d_sae, d_in), contiguous
        b_enc = sae.b_enc.to(self.compute_dtype)
        u = u.detach().to(self.compute_dtype)
        for start in range(0, u.shape[0], self.encode_chunk):
            stop = min(start + self.encode_chunk, u.shape[0])
            yield start, stop, torch.addmm(b_enc, u[start:stop], W_encT.T)

    @torch.no_grad()
    def _select(self, u: Tensor, dead: Tensor, aux_k: int, k: int, token_k: Tensor | None = None) -> Selection:
        """The latents of this step for centred inputs `u` (n_tokens, d_in); `dead` (d_sae,) bool gates AuxK (unread
        when `aux_k` is 0);
        `token_k` (n_tokens,) each token's k (topk with ``k_per_kind``; `k` is then their largest)."""
        if self.sae.cfg.architecture == "batchtopk":
            chosen = self._select_batchtopk(u, dead, aux_k, k)
        else:
            chosen = self._select_topk(u, dead, aux_k, k, token_k)
        if self.compute_dtype == u.dtype:
            return chosen
        # Low-precision scores chose the latents; their values are
        # recomputed in full precision, at k entries per token.
        aux_values = chosen.aux_values
        if aux_k:
            exact = self._exact(u, SparseCode.from_topk(chosen.aux_latents)).view_as(aux_values)
            aux_values = torch.where(aux_values.isfinite(), exact, aux_values)
        return chosen._replace(values=self._exact(u, chosen.code), aux_values=aux_values)

    @torch.no_grad()
    def _select_topk(self, u: Tensor, dead: Tensor, aux_k: int, k: int, token_k: Tensor | None = None) -> Selection:
        """TopK (Gao et al. 2024): the k largest pre-activations of each token (with `token_k` (n_tokens,), the
        token_k[t] largest of token t; k is their largest), then aux_k among dead latents."""
        values = torch.empty(u.shape[0], k + aux_k, device=u.device, dtype=u.dtype)
        latents = torch.empty(u.shape[0], k + aux_k, device=u.device, dtype=torch.long)
        for start, stop, pre in self._encoder_chunks(u):
            values[start:stop, :k], latents[start:stop, :k] = pre.topk(k, dim=1, sorted=token_k is not None)
            if aux_k:
                # Top-k_aux among dead latents only (Gao et al. 2024 §A.2); with
                # fewer dead than aux_k the rest are -inf, which ReLU turns to 0.
                values[start:stop, k:], latents[start:stop, k:] = pre.masked_fill_(~dead, -math.inf).topk(aux_k, dim=1, sorted=False)
        aux = _ascending(values[:, k:], latents[:, k:])
        d_sae = self.sae.cfg.d_sae
        if token_k is None:
            values_k, latents_k = _ascending(values[:, :k], latents[:, :k])
            return Selection(SparseCode.from_topk(latents_k).with_latent_order(d_sae), values_k.reshape(-1), *aux)
        # Each token keeps its token_k largest (the first, sorted); the others sort last and are left out.
        keep = torch.arange(k, device=u.device) < token_k.unsqueeze(1)
        values_k, latents_k = _ascending(values[:, :k], torch.where(keep, latents[:, :k], d_sae))  # kept ones lead
        rows = torch.arange(u.shape[0], device=u.device).unsqueeze(1).expand_as(keep)[keep]
        code = SparseCode.from_rows_cols(rows, latents_k[keep], u.shape[0]).with_latent_order(d_sae)
        return Selection(code, values_k[keep], *aux)

    @torch.no_grad()
    def _select_batchtopk(self, u: Tensor, dead: Tensor, aux_k: int, k: int) -> Selection:
        """BatchTopK (Bussmann et al. 2024): the k * n_tokens largest pre-activations of the batch, in token
        order, then aux_k per token among dead latents."""
        d_sae, n_tokens = self.sae.cfg.d_sae, u.shape[0]
        pre = torch.empty(n_tokens, d_sae, device=u.device, dtype=self.compute_dtype)
        for start, stop, chunk in self._encoder_chunks(u):
            pre[start:stop] = chunk
        if self.world is None:
            values, flat = _largest_entries(pre, k * n_tokens)
            values = values.to(u.dtype)
        else:
            values, flat = self._global_batchtopk(pre, k)
            values = values.to(u.dtype)
        code = SparseCode.from_rows_cols(flat // d_sae, flat % d_sae, n_tokens).with_latent_order(d_sae)
        if not aux_k:
            return Selection(code, values, values.new_empty(n_tokens, 0), flat.new_empty(n_tokens, 0))
        aux = pre.masked_fill_(~dead, -math.inf).topk(aux_k, dim=1, sorted=False)
        return Selection(code, values, *_ascending(aux.values.to(u.dtype), aux.indices))

    @torch.no_grad()
    def _global_batchtopk(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Under N ranks: this rank's entries among the k * n_global largest pre-activations of the global batch.

        ``pre`` (n_tokens, d_sae). Every rank offers its k * n_global largest values (no more can be among
        the global ones); the smallest of the global k * n_global is the threshold each rank keeps its
        entries at or above. Returns (values, flat indices ascending). Equal to one process's selection
        on the whole batch unless pre-activations tie at the threshold.
        """
        world = self.world
        n_global = int(world.sum_(torch.tensor([pre.shape[0]], device=pre.device)))  # one sync per step
        wanted = k * n_global
        offered = pre.view(-1).topk(min(wanted, pre.numel()), sorted=False).values
        every = world.gather_rows(offered.unsqueeze(1)).view(-1)
        threshold = every.topk(min(wanted, every.numel()), sorted=False).values.min()
        flat = (pre.view(-1) >= threshold).nonzero().view(-1)
        return pre.view(-1)[flat], flat

    def _sparse_loss(self, x: Tensor, k: int | None = None, kinds: Tensor | None = None) -> StepLoss:
        """TopK / BatchTopK loss on `x` (n_tokens, d_in): MSE of a sparse decode, plus AuxK while latents are
        dead (Gao et al. 2024 §A.2), plus with ``matryoshka_widths`` the MSE of each inner prefix's decode of
        the same selection (Bussmann et al. 2025). `k`: this step's sparsity; None: the SAE's own."""
        sae, cfg = self.sae, self.sae.cfg
        token_k = None if cfg.k_per_kind is None else sae.token_k(kinds, x.shape[:-1], k)
        k = max(cfg.kind_k(k)) if token_k is not None else cfg.k if k is None else k
        aux_k, dense_aux, dead = self._aux_plan()
        x_n = sae.normalize(x, kinds)
        u = sae.center(x, kinds)
        chosen = self._select(u, dead, 0 if dense_aux else aux_k, k, token_k)
        acts, aux_acts, aux_code = self._encode_selected(u, chosen)
        if cfg.architecture == "batchtopk":
            self._update_threshold(acts.detach())
        recon_n = sparse_decode(acts, sae.W_dec, chosen.code) + sae.b_dec
        loss = metrics.mse(x_n, recon_n)
        for width in (cfg.matryoshka_widths or ())[:-1]:  # each inner prefix reconstructs x on its own
            loss = loss + metrics.mse(x_n, sparse_decode(acts * (chosen.code.cols < width), sae.W_dec,
                                                         chosen.code) + sae.b_dec)
        aux_loss = torch.zeros((), device=x.device)
        if aux_k:
            aux_loss = self._auxk_loss(u, x_n - recon_n, dead, aux_k, dense_aux, aux_acts, aux_code)
            loss = loss + cfg.aux_coefficient * aux_loss
        return StepLoss(loss, recon_n, *self._fired(acts, chosen.code), aux_loss)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, kinds: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The SAE as it stands on `x` (n_tokens, d_in) of `kinds` (n_tokens,) (as in `step`), at its own k:
        (reconstruction (n_tokens, d_in) in the model's units, rows (N,) and latents (N,) of the N non-zero
        activations). TopK takes the step's selection and sparse decode (a tenth of a dense forward's time at
        d_sae 4096, k 32); the other kinds `SAE.forward`. The readouts' per-kind metrics (`vlmsae.train`)."""
        sae = self.sae
        if sae.cfg.architecture != "topk":
            out = sae(x, kinds)
            rows, cols = out.latents.nonzero(as_tuple=True)
            return out.recon, rows, cols
        token_k = None if sae.cfg.k_per_kind is None else sae.token_k(kinds, x.shape[:-1])
        k = max(sae.cfg.kind_k()) if token_k is not None else sae.cfg.k
        chosen = self._select(sae.center(x, kinds), None, 0, k, token_k)
        acts = chosen.values.relu()
        recon = sae.denormalize(sparse_decode(acts, sae.W_dec, chosen.code) + sae.b_dec, kinds)
        live = acts != 0
        return recon, chosen.code.rows[live], chosen.code.cols[live]

    def _aux_plan(self) -> tuple[int, bool, Tensor]:
        """AuxK of this step: aux_k (0 when off), whether it runs dense, and (d_sae,) bool: the latents it may pick."""
        cfg = self.sae.cfg
        aux_k = cfg.aux_k if self.aux_active and cfg.aux_coefficient > 0 else 0
        return aux_k, aux_k > 0 and self.auxk_is_dense(aux_k), self._aux_dead()

    def _auxk_loss(self, u: Tensor, residual: Tensor, dead: Tensor, aux_k: int, dense_aux: bool,
                   aux_acts: Tensor | None, aux_code: SparseCode | None) -> Tensor:
        """() AuxK loss before its coefficient (Gao et al. 2024 §A.2): the dead latents model the `residual`
        (n_tokens, d_in) that the live ones left over (per-element MSE), scaled down while few latents are dead.
        `u`: the centred inputs; `aux_acts` / `aux_code`: the sparse picks (None when it runs dense)."""
        aux_recon = (self._dense_aux_decode(u, dead, aux_k) if dense_aux
                     else sparse_decode(aux_acts, self.sae.W_dec, aux_code))
        return metrics.mse(residual.detach(), aux_recon) * (dead.sum() / aux_k).clamp(max=1)

    def _fired(self, acts: Tensor, code: SparseCode) -> tuple[Tensor, Tensor]:
        """(non-zero latents over the batch (), (d_sae,) long tokens on which each latent fired) of a sparse step."""
        fired = torch.zeros(self.sae.cfg.d_sae, dtype=torch.long, device=acts.device).index_add_(
            0, code.cols, (acts != 0).long())
        return (acts != 0).sum(), fired

    @property
    def aux_active(self) -> bool:
        """Whether the last readout found a dead latent, so that AuxK runs (known on the host)."""
        return self.aux_candidates.numel() > 0

    def auxk_is_dense(self, aux_k: int) -> bool:
        """Whether AuxK takes the dense pass: few enough candidates for its matmuls to beat the sparse gathers."""
        return self.aux_candidates.numel() <= self.dense_auxk_factor * aux_k

    @torch.no_grad()
    def _aux_dead(self) -> Tensor:
        """(d_sae,) bool: the latents AuxK may pick, the last readout's candidates that are still dead (no sync)."""
        dead = self.tokens_since_fired >= self.dead_window
        candidate = torch.zeros_like(dead).index_fill_(0, self.aux_candidates, True)
        return dead & candidate

    def _dense_aux_decode(self, u: Tensor, dead: Tensor, aux_k: int) -> Tensor:
        """(n_tokens, d_in) AuxK reconstruction (no b_dec) from centred inputs `u` (n_tokens, d_in), with grad.

        Dense over the candidates D (Gao et al. 2024 §A.2): pre = u @ W_enc[:, D] + b_enc[D], the top aux_k
        per token among those still `dead` ((d_sae,) bool; the others are -inf, 0 after ReLU), decoded with
        W_dec[D]. The sparse pass's loss and gradients in the weights' dtype; under a lower `compute_dtype`
        (bf16 on CUDA) its matmuls run in that dtype, where the sparse pass recomputes the values in full.
        """
        sae, candidates = self.sae, self.aux_candidates
        with self._autocast(u):
            pre = torch.addmm(sae.b_enc[candidates], u, sae.W_enc.T[candidates].T)  # (n_tokens, n_candidates)
            pre = pre.masked_fill(~dead[candidates], -math.inf)
            top = pre.topk(min(aux_k, candidates.numel()), dim=1, sorted=False)
            acts = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
            return (acts @ sae.W_dec[candidates]).to(u.dtype)

    def _encode_selected(self, u: Tensor, chosen: Selection) -> tuple[Tensor, Tensor, SparseCode | None]:
        """(acts (N,), aux_acts (n_tokens * aux_k,), aux code): the chosen latents' ReLU activations, with grad."""
        sae = self.sae
        if not chosen.aux_latents.shape[1]:
            return gather_pre_acts(u, sae.W_enc.T, sae.b_enc, chosen.code, chosen.values).relu(), None, None
        main_code, aux_code = chosen.code, SparseCode.from_topk(chosen.aux_latents)
        # One encoder backward for both selections: gather them as one code.
        n_main = main_code.cols.shape[0]
        rows = torch.cat([main_code.rows, aux_code.rows])
        order = torch.sort(rows, stable=True).indices
        both = SparseCode.from_rows_cols(rows[order], torch.cat([main_code.cols, aux_code.cols])[order], u.shape[0])
        values = torch.cat([chosen.values, chosen.aux_values.reshape(-1)])[order]
        pre = gather_pre_acts(u, sae.W_enc.T, sae.b_enc, both, values)
        pre = torch.empty_like(pre).index_copy(0, order, pre)  # back to [main entries, aux entries]
        return pre[:n_main].relu(), pre[n_main:].relu(), aux_code

    @torch.no_grad()
    def _exact(self, u: Tensor, code: SparseCode) -> Tensor:
        """(N,) encoder pre-activations at `code`'s entries, in the weights' precision."""
        return entry_dots(self.sae.W_enc.T, u, code) + self.sae.b_enc[code.cols]

    @torch.no_grad()
    def _update_threshold(self, acts: Tensor) -> None:
        """BatchTopK inference threshold: moving average of the smallest kept activation (Bussmann et al. 2024)."""
        sae = self.sae
        smallest = torch.where(acts > 0, acts, math.inf).min()
        if self.world is not None:  # the smallest kept activation of the global batch
            smallest = -self.world.max_(-smallest.reshape(1)).view(())
        lr = sae.cfg.batchtopk_threshold_lr
        moved = (1 - lr) * sae.threshold + lr * smallest.to(sae.threshold.dtype)
        sae.threshold.copy_(torch.where(torch.isfinite(smallest), moved, sae.threshold))

    def _autocast(self, x: Tensor):
        """bf16 (or `compute_dtype`) matmuls over the fp32 weights, when it differs from them."""
        if self.compute_dtype == self.sae.W_dec.dtype:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=self.compute_dtype)

    def _dense_loss(self, x: Tensor, kinds: Tensor | None = None) -> StepLoss:
        """ReLU (decoder-norm-weighted L1) or JumpReLU (L0 through a step function) loss on `x` (n_tokens, d_in)."""
        sae, cfg = self.sae, self.sae.cfg
        x_n = sae.normalize(x, kinds)
        with self._autocast(x):
            pre = sae.pre_acts(x, kinds).float()
        if cfg.architecture == "relu":
            latents = pre.relu()
            # L1 weighted by decoder norms, so shrinking W_enc while growing
            # W_dec cannot dodge the penalty (Anthropic, April 2024 update).
            sparsity = (latents * sae.W_dec.norm(dim=1)).sum(-1).mean()
            coefficient = cfg.l1_coefficient
        else:
            bandwidth = cfg.jumprelu_bandwidth
            latents = _JumpReLU.apply(pre, sae.threshold, bandwidth)
            sparsity = _Step.apply(pre, sae.threshold, bandwidth).sum(-1).mean()
            coefficient = cfg.l0_coefficient
        with self._autocast(x):
            recon_n = (latents @ sae.W_dec + sae.b_dec).float()
        loss = metrics.mse(x_n, recon_n) + coefficient * sparsity
        nonzero = (latents != 0).sum()
        fired = (latents != 0).sum(0)
        return StepLoss(loss, recon_n, nonzero, fired, torch.zeros((), device=x.device))

    @torch.no_grad()
    def _model_units(self, x: Tensor, out: StepLoss, kinds: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(inputs, reconstruction, scale): the metrics' tensors (n_tokens, d_in), which are the model's units once
        divided by the () float64 scale: the normalised ones and act_scale (exact: a power of two), or with
        ``normalize_per_kind`` (one scale per row) the model's own and 1."""
        sae = self.sae
        if sae.cfg.normalize_per_kind:
            return x, sae.denormalize(out.recon, kinds), torch.ones((), dtype=torch.float64, device=x.device)
        return x * sae.act_scale.to(x.dtype), out.recon, sae.act_scale.double()

    @torch.no_grad()
    def _count(self, x: Tensor, out: StepLoss, kinds: Tensor | None = None) -> None:
        """Add one step to the metric window and the dead-latent counters (no host sync)."""
        x_n, recon, scale = self._model_units(x, out, kinds)
        scale2 = scale ** 2  # errors in the model's units
        self.window.add(WindowSums(
            loss=out.loss.double(),
            squared_error=metrics.squared_error(x_n, recon).double() / scale2,
            total_variance=self._total_variance(x_n).double() / scale2,
            nonzero=out.nonzero.double(),
            aux_loss=out.aux_loss.double(),
        ), out.fired)
        self.tokens_since_fired.add_(x.shape[0]).masked_fill_(out.fired > 0, 0)

    def _total_variance(self, x_n: Tensor) -> Tensor:
        """() the FVU denominator of a batch `x_n` (n_tokens, d_in): its variance around its mean, summed."""
        return metrics.total_variance(x_n)

    @torch.no_grad()
    def _reduce_step(self, x: Tensor, out: StepLoss, kinds: Tensor | None = None) -> Tensor:
        """Under N ranks: make this step's gradients and counts those of the global batch; returns its tokens
        (a () long tensor on the device).

        One all-reduce (float64) of the token count, the metric sums, sum(x) and sum(x^2) (the global
        variance: sum ||x - mean||^2 = sum x^2 - ||sum x||^2 / n) and the fire counts; the window and the
        dead-latent counters then advance exactly as one process's on the whole batch. A second all-reduce
        sums the gradients, each scaled by its rank's share of the tokens (see ``vlmsae.distributed``).
        """
        sae, world, n = self.sae, self.world, x.shape[0]
        x_n, recon, scale = self._model_units(x, out._replace(recon=out.recon.detach()), kinds)
        x_n = x_n.double()
        scale2 = scale ** 2
        d_in = x.shape[1]
        local = torch.cat([
            torch.stack([torch.tensor(float(n), dtype=torch.float64, device=x.device),
                         out.loss.detach().double() * n,
                         metrics.squared_error(x_n, recon).double() / scale2,
                         x_n.pow(2).sum() / scale2,
                         out.nonzero.double(),
                         out.aux_loss.detach().double() * n]),
            x_n.sum(0) / scale,
            out.fired.double(),
        ])
        total = world.sum_(local)
        n_global, loss, squared_error, sum_sq, nonzero, aux_loss = total[:6].unbind()
        sum_x, fired = total[6:6 + d_in], total[6 + d_in:].long()
        self.window.add(WindowSums(loss=loss / n_global, squared_error=squared_error,
                                   total_variance=sum_sq - sum_x.pow(2).sum() / n_global, nonzero=nonzero,
                                   aux_loss=aux_loss / n_global), fired)
        n_global = n_global.round().long()
        self.tokens_since_fired.add_(n_global).masked_fill_(fired > 0, 0)
        grads = [p.grad for p in sae.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat.mul_((n / n_global).to(flat.dtype))
        world.sum_(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
        return n_global

    def _fold_pending_tokens(self) -> None:
        """Under N ranks: add the global tokens counted on the device since the last call (one host sync)."""
        if self.world is not None:
            n = int(self.pending_tokens)
            self.n_tokens += n
            self.window.tokens += n
            self.pending_tokens.zero_()

    def read_metrics(self) -> TrainMetrics:
        """Move the accumulated metrics to the host (one sync) and start a new window."""
        self._fold_pending_tokens()
        cfg, window = self.sae.cfg, self.window
        tokens, steps = max(window.tokens, 1), max(self.n_steps - window.start, 1)
        # Dead: fired on none of the last dead_window tokens, the config's window or, in a shorter run, all of it.
        self.dead_window = max(1, min(cfg.dead_tokens, self.n_tokens))
        dead_mask = self.tokens_since_fired >= self.dead_window
        dead_first = torch.sort((~dead_mask).to(torch.uint8), stable=True).indices  # dead latents first, ascending
        *sums, n_dead, dense = torch.cat([
            window.sums,
            dead_mask.sum().double().view(1),
            metrics.dense_fraction(window.fire_count, tokens).double().view(1),
        ]).tolist()
        dead = n_dead / cfg.d_sae
        sums = WindowSums(*sums)
        if not math.isfinite(sums.loss):
            raise NonFiniteError(
                f"training loss is {sums.loss} over steps {window.start + 1}..{self.n_steps}; "
                "check the activations for NaN/Inf or lower the learning rate"
            )
        window.reset(self.n_steps)
        # The one place that learns, on the host, which latents AuxK may pick until the next readout. Under N
        # ranks the counters are global, so every rank holds the same candidates.
        self.aux_candidates = dead_first[:int(n_dead)].clone()
        return TrainMetrics(
            step=self.n_steps,
            tokens=self.n_tokens,
            loss=sums.loss / steps,
            mse=sums.squared_error / (tokens * cfg.d_in),
            fvu=sums.squared_error / sums.total_variance if sums.total_variance > 0 else float("nan"),
            l0=sums.nonzero / tokens,
            aux_loss=sums.aux_loss / steps,
            dead_fraction=dead,
            dense_fraction=dense,
            dead_window=self.dead_window,
        )

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """Everything a resumed trainer needs: tensors (SAE, optimiser, counters) and JSON-able values."""
        self._fold_pending_tokens()
        tensors = {f"sae.{k}": v.detach().contiguous().clone() for k, v in self.sae.state_dict().items()}
        optim = self.optimizer.state_dict()
        for index, slots in optim["state"].items():
            # Adam's 0-dim step counters cloned: else they are the live ones, which the next step advances in place
            # (the moments are written out before the next step, as the SAE's own clones are: no copy of them here)
            tensors |= {f"optim.{index}.{k}": torch.as_tensor(v).clone() if torch.as_tensor(v).dim() == 0
                        else torch.as_tensor(v).contiguous() for k, v in slots.items()}
        tensors |= {"tokens_since_fired": self.tokens_since_fired, "fire_count": self.window.fire_count,
                    "sums": self.window.sums, "aux_candidates": self.aux_candidates}
        meta = {"param_groups": optim["param_groups"], "n_steps": self.n_steps, "n_tokens": self.n_tokens,
                "window_start": self.window.start, "window_tokens": self.window.tokens,
                "initialized": self.initialized, "dead_window": self.dead_window,
                "history": [asdict(m) for m in self.history]}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, Tensor], meta: dict, source: str = "checkpoint") -> None:
        """Restore what :meth:`state_dict` returned; ``source`` names where it came from in errors."""
        own = self.sae.state_dict()
        for name, value in own.items():
            saved = tensors.get(f"sae.{name}")
            if saved is None or saved.shape != value.shape:
                raise ConfigError(f"{source}: the saved SAE's {name} is {None if saved is None else tuple(saved.shape)}"
                                  f", this trainer's is {tuple(value.shape)}; resume with the same SAE shapes")
        self.sae.load_state_dict({name: tensors[f"sae.{name}"] for name in own})
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        state = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, slot = key.split(".", 2)
                param = params[int(index)]
                # copied, never shared with the caller's tensors (the optimiser advances its step counters in place);
                # Adam's state keeps its parameter's strides
                value = (torch.empty_like(param, dtype=value.dtype).copy_(value) if value.shape == param.shape
                         else value.clone())
                state.setdefault(int(index), {})[slot] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
        self.window.fire_count.copy_(tensors["fire_count"])
        self.window.sums.copy_(tensors["sums"])
        self.n_steps, self.n_tokens = meta["n_steps"], meta["n_tokens"]
        self.window.start, self.window.tokens = meta["window_start"], meta["window_tokens"]
        self.initialized = meta["initialized"]
        self.dead_window = meta.get("dead_window", self.sae.cfg.dead_tokens)
        if "aux_candidates" in tensors:
            self.aux_candidates = tensors["aux_candidates"].to(self.aux_candidates.device).clone()
        else:  # a checkpoint from before the candidates: AuxK's latents are those dead now, if it ran
            dead = self.tokens_since_fired >= self.sae.cfg.dead_tokens
            self.aux_candidates = dead.nonzero().view(-1) if meta.get("aux_active") else self.aux_candidates[:0]
        self.history = [TrainMetrics(**m) for m in meta["history"]]
        self._store()


def default_compute_dtype(weights: Tensor, architecture: str) -> torch.dtype:
    """The matmul dtype of a trainer whose config leaves ``compute_dtype`` unset, for float32 `weights` of an SAE of
    `architecture`: bfloat16 on CUDA (every kind's matmuls, under autocast); on a CPU with native bf16 dot products
    (AVX512-BF16 or AMX tiles, where the bf16 selection matmul runs about 2.5x the float32 one: benchmarks/RESULTS.md,
    "SAE training step") bfloat16 for the TopK kinds' selection and dense AuxK pass only; else `weights`' dtype.

    On the sparse path bf16 only ranks the latents: their values, the loss and its gradients stay in float32, so a
    latent is chosen differently only where two pre-activations tie within bf16's rounding (2**-8 relative); FVU and
    planted-feature recovery stay within 1% of the float32 selection (benchmarks/bench_bf16_selection.py)."""
    if weights.dtype != torch.float32:
        return weights.dtype
    if weights.device.type == "cuda":
        return torch.bfloat16
    if weights.device.type == "cpu" and architecture in ("topk", "batchtopk") and _cpu_has_native_bf16():
        return torch.bfloat16
    return weights.dtype


def _cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); False where torch cannot tell."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def _largest_entries(pre: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """(values, flat indices ascending) of the ``count`` largest entries of ``pre`` (n_tokens, d_sae): BatchTopK's pick.

    On CPU one topk over a batch's millions of pre-activations is a third of a BatchTopK step (measured:
    0.38 s of 1.2 s at batch 1024, d_sae 4096, k 25). A strided sample of about ``TOPK_SAMPLE`` entries (the
    stride prime to d_sae, so every latent is sampled) bounds the count-th largest value from below, with a
    margin; the entries at or above the bound (about 1.3 count) go to topk, which picks what a topk over all
    would. If fewer than ``count`` pass, a topk over all runs. CUDA keeps the single topk: the filter's count
    would be a host sync.
    """
    flat = pre.reshape(-1)
    n = flat.numel()
    if flat.device.type == "cpu" and n >= 4 * TOPK_SAMPLE and 16 * count <= n:
        stride = n // TOPK_SAMPLE
        while math.gcd(stride, pre.shape[-1]) != 1:
            stride += 1
        sample = flat[::stride]
        expected = count * sample.numel() / n  # sampled entries among the count largest
        rank = min(sample.numel(), int(1.25 * expected + 4 * math.sqrt(expected) + 8))
        bound = sample.topk(rank, sorted=False).values.min()
        candidates = (flat >= bound).nonzero().view(-1)
        if candidates.numel() >= count:
            values, order = flat[candidates].topk(count, sorted=False)
            indices, ascending = candidates[order].sort()
            return values[ascending], indices
    values, indices = flat.topk(count, sorted=False)
    indices, ascending = indices.sort()
    return values[ascending], indices


def _ascending(values: Tensor, latents: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder each token's entries by latent index, as `SparseCode` wants."""
    latents, order = latents.sort(dim=1)
    return values.gather(1, order), latents


def _kernel_sum(pre: Tensor, threshold: Tensor, bandwidth: float, grad_out: Tensor) -> Tensor:
    """(d_sae,) sum over tokens of `grad_out` (n, d_sae) where the rectangle kernel of Rajamanoharan et al. 2024
    is on: only pre-activations within bandwidth/2 of the threshold move it. JumpReLU and the step share it."""
    near = ((pre - threshold).abs() < bandwidth / 2).to(grad_out.dtype)
    return (near * grad_out).sum(0)


class _JumpReLU(torch.autograd.Function):
    """z * H(z - threshold), with the straight-through threshold gradient of Rajamanoharan et al. 2024."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        grad_threshold = -(threshold / bandwidth) * _kernel_sum(pre, threshold, bandwidth, grad_out)
        return grad_out * (pre > threshold), grad_threshold, None


class _Step(torch.autograd.Function):
    """H(z - threshold), the L0 count, with the threshold gradient of Rajamanoharan et al. 2024; none to z."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        return None, -(1 / bandwidth) * _kernel_sum(pre, threshold, bandwidth, grad_out), None


__getattr__ = renamed_attributes(__name__, {"TrainerConfig": "SAETrainerConfig"}, globals())
