"""A worker's cache of an image set's tokens entering block k of the unreduced model.

Every schedule that reduces nothing before block k computes the same tokens there, so its forward
can start from them and run only the blocks from k on. Two sources:

* shared blocks: captured once per run by the pass that computes the unreduced logits
  (search.evaluate.predict_keeping; the blocks `shared_blocks` picks within the memory budget),
  then read by every worker and stage from the run cache, memory-mapped (search.shared_logits);
* the worker's own blocks: computed on demand from the deepest block at hand, within what the
  budget leaves, dropping the least recently used block when a new one does not fit.

A schedule starts from the tokens entering its first reducing block when they are at hand or fit,
else from the deepest shared block before it (those blocks are unreduced in the schedule too), else
from the images.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection

import torch
from torch import Tensor, nn

from reducers.prefix import embed, tokens_entering
from search.data import TensorSet


def block_bytes(model: nn.Module, images: int) -> int:
    """The size of one block's entering tokens for `images` images (every token of the unreduced model)."""
    param = next(model.parameters())
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    return images * tokens * model.embed_dim * param.element_size()


def shared_blocks(depth: int, one_block: int, budget_bytes: int) -> tuple[int, ...]:
    """The blocks whose entering tokens a run keeps for all its workers: every block 1..depth-1 when
    they fit `budget_bytes` together, else as many as fit, spread evenly over the depth."""
    fit = min(depth - 1, budget_bytes // one_block) if one_block > 0 else 0
    return tuple(sorted({round(i * depth / (fit + 1)) for i in range(1, fit + 1)}))


class PrefixCache:
    """Tokens [N, T, C] of one image set entering block k of one (unreduced) model, by k."""

    def __init__(self, model: nn.Module, data: TensorSet, *, batch_size: int, budget_bytes: int,
                 shared: dict[int, Tensor] | None = None,
                 more_shared: Callable[[Collection[int]], dict[int, Tensor]] | None = None) -> None:
        """`shared`: blocks at hand (read-only, memory-mapped files: never dropped); `more_shared(known)`:
        the shared blocks that have appeared since, but for those `known` (files still being written)."""
        self.model, self.data, self.batch_size, self.budget = model, data, batch_size, budget_bytes
        self.shared = dict(shared or {})
        self.more_shared = more_shared
        self._blocks: OrderedDict[int, Tensor] = OrderedDict()  # the worker's own, least recently used first
        self.computed_blocks = 0  # blocks run over the whole set to fill the cache (bookkeeping)

    def block_bytes(self) -> int:
        """The size of one block's tokens for the whole set."""
        return block_bytes(self.model, len(self.data))

    def nbytes(self) -> int:
        """The worker's own blocks (the shared ones are counted in `room`)."""
        return sum(t.numel() * t.element_size() for t in self._blocks.values())

    def room(self) -> int:
        """What the budget leaves for the worker's own blocks."""
        return self.budget - sum(t.numel() * t.element_size() for t in self.shared.values())

    @torch.inference_mode()
    def tokens(self, block: int) -> Tensor | None:
        """The tokens entering `block` (1 <= block <= depth), or None when they are not shared and
        do not fit what the budget leaves, or block is 0 (nothing to reuse before the first block)."""
        if block <= 0:
            return None
        if block not in self.shared and self.more_shared is not None:
            self.shared.update(self.more_shared(self.shared.keys()))
        if block in self.shared:
            return self.shared[block]
        if self.block_bytes() > self.room():
            return None
        if block in self._blocks:
            self._blocks.move_to_end(block)
            return self._blocks[block]
        start = max((k for k in [*self.shared, *self._blocks] if k < block), default=0)
        tokens = self._run(start, block)
        size = tokens.numel() * tokens.element_size()
        while self._blocks and self.nbytes() + size > self.room():
            self._blocks.popitem(last=False)
        self._blocks[block] = tokens
        return tokens

    def start(self, block: int) -> tuple[int, Tensor] | None:
        """Where a forward whose first reducing block is `block` starts: (k, tokens entering k),
        k = block when `tokens` has them, else the deepest shared block before it; None: the images."""
        tokens = self.tokens(block)
        if tokens is not None:
            return block, tokens
        below = max((k for k in self.shared if k <= block), default=None)
        return None if below is None else (below, self.shared[below])

    def _run(self, start: int, block: int) -> Tensor:
        device = next(self.model.parameters()).device
        self.model.eval()
        out = []
        if start == 0:
            for x, _ in self.data.batches(self.batch_size, device):
                out.append(tokens_entering(self.model, embed(self.model, x), 0, block))
        else:
            cached = self.shared[start] if start in self.shared else self._blocks[start]
            for i in range(0, cached.shape[0], self.batch_size):
                out.append(tokens_entering(self.model, cached[i:i + self.batch_size].to(device), start, block))
        self.computed_blocks += block - start
        return torch.cat(out)
