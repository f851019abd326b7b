"""Sparse latent codes and the two autograd functions that keep a TopK step sparse.

With TopK, only k of d_sae latents are non-zero per token, so after the one
dense matmul that scores every latent, everything else (decoding, and every
gradient, the encoder's included) touches k rows per token. Four of the five
pieces are sums of weighted rows, which `embedding_bag` computes without
materialising a (tokens * k, d_in) tensor:

    decode:       recon[t]   = sum_{entries e of token t}  value_e * W_dec[latent_e]
    grad W_dec:   dW_dec[i]  = sum_{entries e of latent i} value_e * grad_recon[token_e]
    grad input:   du[t]      = sum_{entries e of token t}  dpre_e * W_encT[latent_e]
    grad W_enc:   dW_encT[i] = sum_{entries e of latent i} dpre_e * u[token_e]

and the fifth, grad value_e = W_dec[latent_e] . grad_recon[token_e], is a
sampled dense-dense matmul. Per-token sums read the entries in token order
(`row_offsets`); per-latent sums read them in latent order, found by one sort
that the decoder and encoder backward passes share.
"""

import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class SparseCode:
    """Which latents are active for which tokens: N entries, grouped by token, latents ascending within a token."""

    rows: Tensor
    """(N,) token of each entry, non-decreasing."""
    cols: Tensor
    """(N,) latent of each entry."""
    row_offsets: Tensor
    """(n_tokens,) index of each token's first entry."""
    latent_order: Tensor | None = None
    """(N,) the entries sorted by latent, once `with_latent_order` has run."""
    latent_offsets: Tensor | None = None
    """(d_sae,) where each latent's entries start in `latent_order`."""

    @classmethod
    def from_topk(cls, latents: Tensor) -> "SparseCode":
        """(n_tokens, k) latent indices, k per token, ascending within each row."""
        n_tokens, k = latents.shape
        rows = torch.arange(n_tokens, device=latents.device).repeat_interleave(k)
        return cls(rows, latents.reshape(-1), torch.arange(n_tokens, device=latents.device) * k)

    @classmethod
    def from_rows_cols(cls, rows: Tensor, cols: Tensor, n_tokens: int) -> "SparseCode":
        """Entries already grouped by token (rows non-decreasing)."""
        return cls(rows, cols, torch.searchsorted(rows, torch.arange(n_tokens, device=rows.device)))

    def with_latent_order(self, d_sae: int) -> "SparseCode":
        """The same code, with the latent order that the per-latent gradient sums need."""
        if self.latent_order is not None:
            return self
        cols, order = torch.sort(self.cols)
        # searchsorted, unlike bincount, needs no host synchronisation on CUDA.
        return replace(self, latent_order=order, latent_offsets=torch.searchsorted(cols, torch.arange(d_sae, device=cols.device)))


def _rows_sum(index: Tensor, offsets: Tensor, table: Tensor, weights: Tensor) -> Tensor:
    """out[b] = sum over bag b of weights_e * table[index_e]; bags start at `offsets`."""
    return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype))


def _per_latent_sum(code: SparseCode, per_token: Tensor, weights: Tensor, d_sae: int) -> Tensor:
    """(d_sae, d_in): out[i] = sum over entries e of latent i of weights_e * per_token[rows_e]."""
    code = code.with_latent_order(d_sae)
    order = code.latent_order
    return _rows_sum(code.rows[order], code.latent_offsets, per_token, weights[order])


def entry_dots(W: Tensor, per_token: Tensor, code: SparseCode) -> Tensor:
    """(N,): out[e] = W[cols_e] . per_token[rows_e], as a sampled dense-dense matmul.

    Computing (per_token @ W.T) only at the code's entries beats gathering the
    rows of W by about 3x on CPU, and never builds the (n_tokens, d_sae) product.
    """
    # the last offset as a fill value, not new_tensor([...]): no host-to-device copy per step on CUDA
    crow = torch.nn.functional.pad(code.row_offsets, (0, 1), value=code.cols.shape[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        pattern = torch.sparse_csr_tensor(
            crow, code.cols, torch.zeros(code.cols.shape, device=W.device, dtype=W.dtype),
            size=(per_token.shape[0], W.shape[0]), check_invariants=False,
        )
    return torch.sparse.sampled_addmm(pattern, per_token.to(W.dtype), W.T, beta=0).values()


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, W_dec: Tensor, code: SparseCode) -> Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.code = code
        return _rows_sum(code.cols, code.row_offsets, W_dec, values)

    @staticmethod
    def backward(ctx, grad_recon: Tensor):
        values, W_dec = ctx.saved_tensors
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = entry_dots(W_dec, grad_recon, ctx.code).to(values.dtype)
        if ctx.needs_input_grad[1]:
            grad_W_dec = _per_latent_sum(ctx.code, grad_recon.to(W_dec.dtype), values, W_dec.shape[0])
        return grad_values, grad_W_dec, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, W_encT: Tensor, b_enc: Tensor, code: SparseCode, values: Tensor) -> Tensor:
        ctx.save_for_backward(u, W_encT)
        ctx.code = code
        ctx.d_sae = b_enc.shape[0]
        return values.clone()

    @staticmethod
    def backward(ctx, grad_pre: Tensor):
        u, W_encT = ctx.saved_tensors
        code = ctx.code
        grad_u = grad_W_encT = grad_b_enc = None
        if ctx.needs_input_grad[0]:
            grad_u = _rows_sum(code.cols, code.row_offsets, W_encT, grad_pre).to(u.dtype)
        if ctx.needs_input_grad[1]:
            grad_W_encT = _per_latent_sum(code, u.to(W_encT.dtype), grad_pre, ctx.d_sae)
        if ctx.needs_input_grad[2]:
            grad_b_enc = torch.zeros(ctx.d_sae, device=grad_pre.device, dtype=grad_pre.dtype).index_add_(0, code.cols, grad_pre)
        return grad_u, grad_W_encT, grad_b_enc, None, None


def sparse_decode(values: Tensor, W_dec: Tensor, code: SparseCode) -> Tensor:
    """(N,) latent values at `code`'s entries -> (n_tokens, d_in) = latents @ W_dec, without b_dec."""
    return _Decode.apply(values, W_dec, code)


def gather_pre_acts(u: Tensor, W_encT: Tensor, b_enc: Tensor, code: SparseCode, values: Tensor) -> Tensor:
    """The encoder pre-activations (u @ W_encT.T + b_enc) at `code`'s entries, given their `values`.

    The values come from the selection pass (computed once, densely, without
    autograd); this function attaches the sparse gradient to u, W_encT and b_enc.
    """
    return _Gather.apply(u, W_encT, b_enc, code, values)
