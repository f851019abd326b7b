"""One owner per layer under N ranks: each rank trains only its layers' SAEs, fed by every rank's forwards.

Data parallel (the default, :mod:`vlmsae.distributed`) keeps a replica of every SAE on every rank and
all-reduces their gradients, so the bytes a step moves are the SAEs' size, for every layer, whatever
the batch. With many layers trained from one forward, owner per layer moves activations instead:
rank r runs its shard of the data through the frozen model (stopped after the deepest trained
layer), screens each layer's rows as a buffer does (padding and norm outliers out), and sends them
to the rank that owns that layer, in one ``all_to_all`` per forward: every row travels once, to one
rank, never to all. The owner writes the rows of rank 0, 1, ... in that order into the layer's one
buffer (the whole global buffer) and steps its SAEs on whole global batches with no gradient
exchange. So the SAEs equal those of one process fed the same batches in the order rank 0's,
rank 1's, ... of each round (bitwise on CPU when every fill ends on a round's last forward; a round
runs one forward on every rank, and rows that do not fit a full buffer are left out, as in one
process). Layer ``i`` of the sorted trained layers belongs to rank ``i % world size``.

Bytes moved per forward: each kept row of each layer once, ``d_model`` values in the buffer's dtype
plus four 8-byte tags (kind, position, token, sample); with W ranks, (W - 1) / W of them leave their rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .buffer import Admission, Rows, RingBuffer, tag_rows
from .distributed import World, collective
from .errors import ConfigError


class LayerOwners:
    """Which rank owns which layer, and the per-forward exchange of rows to their owners.

    ``layers``: every trained layer (the same list on every rank). Raises ``ConfigError`` when there
    are fewer layers than ranks (a rank without a layer would have no step to take).
    """

    def __init__(self, layers: list[int], world: World):
        self.layers, self.world = sorted(layers), world
        if len(self.layers) < world.size:
            raise ConfigError(f"parallel='layers' gives each of the {world.size} ranks at least one layer, but "
                              f"layers {self.layers} are {len(self.layers)}; train at least {world.size} layers, "
                              f"launch at most {len(self.layers)} ranks, or use parallel='data'")
        self.owner = {L: i % world.size for i, L in enumerate(self.layers)}
        self.mine = [L for L in self.layers if self.owner[L] == world.rank]

    def fill(self, source, buffers: dict[int, RingBuffer], screens: dict[int, Admission]) -> None:
        """Rounds of one forward per rank until the buffers of every rank's layers are full.

        ``source``: a :class:`vlmsae.data.LiveSource` over this rank's shard; ``buffers``: this rank's
        layers; ``screens``: an :class:`vlmsae.buffer.Admission` per layer (every layer) that screens this
        rank's rows before they are sent. A rank whose data fails raises its own error and every other rank
        a ``ConfigError`` naming the round, all in the same round (no rank waits in a collective for it).
        """
        world = self.world
        while world.any(any(b.free_rows() for b in buffers.values())):
            error, rows = None, {}

            def sink(layer: int, resid: Tensor, fwd) -> None:
                tagged = tag_rows(resid, fwd, 0, resid.device)
                keep = screens[layer].screen(tagged)
                rows[layer] = Rows(*(t[keep] for t in tagged)), resid.shape[0]

            try:
                source.forward(sink)
            except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
                error = err
            if world.any(error is not None):
                if error is not None:
                    raise error
                raise ConfigError(f"another rank could not run its forward after {source.used} batches here (its "
                                  "data ran out or failed; its own error says why); every rank stops here")
            for layer, parts in self.exchange(rows, buffers).items():
                buffer = buffers[layer]
                for part, samples in parts:
                    buffer.write_rows(part._replace(sample=part.sample + buffer.samples))
                    buffer.samples += samples

    def exchange(self, rows: dict[int, tuple[Rows, int]], buffers: dict[int, RingBuffer]) \
            -> dict[int, list[tuple[Rows, int]]]:
        """This rank's rows of every layer out, the rows of this rank's layers in.

        ``rows``: ``{layer: (Rows, n_samples)}`` of one forward, sample ids counted from 0.
        Returns, for each layer this rank owns, ``[(Rows, n_samples of that rank), ...]`` in rank order.
        One all-gather of the row counts, then one ``all_to_all`` of the activations and one of the tags.
        """
        world, device = self.world, self.world.device
        n_samples = rows[self.layers[0]][1]
        rows = {L: r for L, (r, _) in rows.items()}
        counts = torch.tensor([rows[L].acts.shape[0] for L in self.layers] + [n_samples], device=device)
        every = [torch.empty_like(counts) for _ in range(world.size)]
        collective(dist.all_gather, every, counts)
        every = torch.stack(every).tolist()  # [rank][layer index ..., samples]
        index = {L: i for i, L in enumerate(self.layers)}
        send = [L for q in range(world.size) for L in self.layers if self.owner[L] == q]
        sent = [sum(every[world.rank][index[L]] for L in self.layers if self.owner[L] == q) for q in range(world.size)]
        got = [sum(every[r][index[L]] for L in self.mine) for r in range(world.size)]
        width, dtype = next(iter(buffers.values())).acts.shape[1], next(iter(buffers.values())).acts.dtype
        acts = self._all_to_all(torch.cat([rows[L].acts.to(device, dtype) for L in send]).reshape(-1, width),
                                sent, got)
        tags = self._all_to_all(torch.cat([_tags(rows[L]).to(device) for L in send]).reshape(-1, 4), sent, got)
        out, start = {L: [] for L in self.mine}, 0
        for r in range(world.size):
            for L in self.mine:
                stop = start + every[r][index[L]]
                kind, position, token, sample = tags[start:stop].unbind(1)
                rows_in = Rows(acts[start:stop], kind.to(torch.int8), position.to(torch.int32),
                               token.to(torch.int32), sample)
                out[L].append((rows_in, every[r][-1]))
                start = stop
        return out

    def _all_to_all(self, tensor: Tensor, sent: list[int], got: list[int]) -> Tensor:
        received = tensor.new_empty(sum(got), tensor.shape[1])
        collective(dist.all_to_all_single, received, tensor.contiguous(), output_split_sizes=got,
                   input_split_sizes=sent)
        return received

    def share(self, saes: dict) -> None:
        """Every SAE from its owner to every rank (weights and buffers), so that all ranks end with all of them."""
        for L in self.layers:
            for sae in saes[L]:
                for tensor in sae.state_dict().values():
                    self.world.broadcast_(tensor, src=self.owner[L])

    def gather(self, latest: dict) -> dict:
        """``{key: value}`` of every rank merged on every rank (small Python objects, e.g. the readout metrics)."""
        return {k: v for part in self.world.gather_objects(latest) for k, v in part.items()}


def _tags(rows: Rows) -> Tensor:
    """``(n, 4)`` int64: kind, position, token, sample of each row (sent with the activations)."""
    return torch.stack([rows.kind.long(), rows.position.long(), rows.token.long(), rows.sample.long()], dim=1)
