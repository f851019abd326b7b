"""Sparse latent codes and the two autograd functions that keep a TopK step sparse.

With TopK, only k of d_sae latents are non-zero per token, so after the one
dense matmul that scores every latent, everything else (decoding, and every
gradient, the encoder's included) touches k rows per token. Both functions
below are sums of weighted rows, which `embedding_bag` computes without
materialising a (tokens * k, d_in) tensor:

    decode:        recon[t]    = sum_{entries e of token t}  value_e * W_dec[latent_e]
    grad W_dec:    dW_dec[i]   = sum_{entries e of latent i} value_e * grad_recon[token_e]
    grad input:    du[t]       = sum_{entries e of token t}  dpre_e * W_encT[latent_e]
    grad W_enc:    dW_encT[i]  = sum_{entries e of latent i} dpre_e * u[token_e]

The per-token sums read the entries in token order (`row_offsets`); the
per-latent sums read them in latent order (`by_latent`), found by one sort.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class SparseCode(NamedTuple):
    """Which latents are active for which tokens: N entries grouped by token."""

    rows: Tensor
    """(N,) token of each entry, non-decreasing."""
    cols: Tensor
    """(N,) latent of each entry."""
    row_offsets: Tensor
    """(n_tokens,) index of each token's first entry."""
    width: int | None
    """Entries per token when every token has the same number (TopK), else None."""

    @classmethod
    def from_topk(cls, indices: Tensor) -> "SparseCode":
        """(n_tokens, k) latent indices, k per token."""
        n_tokens, k = indices.shape
        rows = torch.arange(n_tokens, device=indices.device).repeat_interleave(k)
        return cls(rows, indices.reshape(-1), torch.arange(n_tokens, device=indices.device) * k, k)

    @classmethod
    def from_rows_cols(cls, rows: Tensor, cols: Tensor, n_tokens: int) -> "SparseCode":
        """Entries already grouped by token (rows non-decreasing)."""
        offsets = torch.searchsorted(rows, torch.arange(n_tokens, device=rows.device))
        return cls(rows, cols, offsets, None)

    def by_latent(self, d_sae: int) -> tuple[Tensor, Tensor]:
        """(order, latent_offsets): entries sorted by latent, and where each latent's entries start."""
        cols, order = torch.sort(self.cols)
        # searchsorted, unlike bincount, needs no host synchronisation on CUDA.
        return order, torch.searchsorted(cols, torch.arange(d_sae, device=cols.device))


def _rows_sum(index: Tensor, offsets: Tensor, table: Tensor, weights: Tensor) -> Tensor:
    """out[b] = sum over bag b of weights_e * table[index_e]; bags start at `offsets`."""
    return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype))


def _entry_dots(W: Tensor, per_token: Tensor, code: "SparseCode", chunk_elements: int = 1 << 22) -> Tensor:
    """out[e] = W[cols[e]] . per_token[rows[e]]: the gradient of each entry's value, in memory-bounded chunks."""
    per_token = per_token.to(W.dtype)
    if code.width is not None and code.width * 16 >= W.shape[0]:
        # Dense enough that one matmul (fast per element) beats gathering rows
        # (slow per element): score every latent, keep the chosen ones.
        return (per_token @ W.T).gather(1, code.cols.view(-1, code.width)).view(-1)
    if code.width is not None:
        # k entries per token: gather W's rows and multiply each token's block at once.
        width, d = code.width, W.shape[1]
        tokens = max(1, chunk_elements // (width * d))
        out = torch.empty(code.cols.shape[0], device=W.device, dtype=W.dtype)
        for start in range(0, per_token.shape[0], tokens):
            stop = min(start + tokens, per_token.shape[0])
            rows = W.index_select(0, code.cols[start * width : stop * width]).view(stop - start, width, d)
            out[start * width : stop * width] = torch.bmm(rows, per_token[start:stop].unsqueeze(2)).view(-1)
        return out
    entries = max(1, chunk_elements // W.shape[1])
    out = torch.empty(code.cols.shape[0], device=W.device, dtype=W.dtype)
    for start in range(0, code.cols.shape[0], entries):
        stop = start + entries
        rows, tokens = W.index_select(0, code.cols[start:stop]), per_token.index_select(0, code.rows[start:stop])
        out[start:stop] = torch.bmm(rows.unsqueeze(1), tokens.unsqueeze(2)).view(-1)
    return out


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, W_dec: Tensor, code: SparseCode) -> Tensor:
        ctx.save_for_backward(values, W_dec, code.rows, code.cols, code.row_offsets)
        ctx.width = code.width
        return _rows_sum(code.cols, code.row_offsets, W_dec, values)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, W_dec, rows, cols, row_offsets = ctx.saved_tensors
        code = SparseCode(rows, cols, row_offsets, ctx.width)
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = _entry_dots(W_dec, grad_out, code).to(values.dtype)
        if ctx.needs_input_grad[1]:
            order, latent_offsets = code.by_latent(W_dec.shape[0])
            grad_W_dec = _rows_sum(rows[order], latent_offsets, grad_out.to(W_dec.dtype), values[order])
        return grad_values, grad_W_dec, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, W_encT: Tensor, b_enc: Tensor, code: SparseCode, values: Tensor) -> Tensor:
        ctx.save_for_backward(u, W_encT, code.rows, code.cols, code.row_offsets)
        ctx.width = code.width
        ctx.b_enc_shape = b_enc.shape
        return values.clone()

    @staticmethod
    def backward(ctx, grad_pre: Tensor):
        u, W_encT, rows, cols, row_offsets = ctx.saved_tensors
        code = SparseCode(rows, cols, row_offsets, ctx.width)
        grad_u = grad_W_encT = grad_b_enc = None
        if ctx.needs_input_grad[0]:
            grad_u = _rows_sum(cols, row_offsets, W_encT, grad_pre).to(u.dtype)
        if ctx.needs_input_grad[1]:
            order, latent_offsets = code.by_latent(W_encT.shape[0])
            grad_W_encT = _rows_sum(rows[order], latent_offsets, u.to(W_encT.dtype), grad_pre[order])
        if ctx.needs_input_grad[2]:
            grad_b_enc = torch.zeros(ctx.b_enc_shape, device=grad_pre.device, dtype=grad_pre.dtype).index_add_(0, cols, grad_pre)
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
