"""A worker's cache of the screening set's tokens entering block k of the unreduced model.

Every schedule that reduces nothing before block k computes the same tokens there, so a worker
computes them once (from the deepest block already cached) and each such trial runs only the
blocks from k on. The cache holds whole sets of tokens within a memory budget, dropping the
least recently used block when a new one does not fit; a block whose tokens alone exceed the
budget is not cached (the trial runs from the images).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from reducers.prefix import embed, tokens_entering
from search.data import TensorSet


class PrefixCache:
    """Tokens [N, T, C] of one image set entering block k of one (unreduced) model, by k."""

    def __init__(self, model: nn.Module, data: TensorSet, *, batch_size: int, budget_bytes: int) -> None:
        self.model, self.data, self.batch_size, self.budget = model, data, batch_size, budget_bytes
        self._blocks: OrderedDict[int, Tensor] = OrderedDict()  # least recently used first
        self.computed_blocks = 0  # blocks run over the whole set to fill the cache (bookkeeping)

    def block_bytes(self) -> int:
        """The size of one block's tokens for the whole set (every token of the unreduced model)."""
        param = next(self.model.parameters())
        tokens = self.model.patch_embed.num_patches + self.model.num_prefix_tokens
        return len(self.data) * tokens * self.model.embed_dim * param.element_size()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._blocks.values())

    @torch.inference_mode()
    def tokens(self, block: int) -> Tensor | None:
        """The tokens entering `block` (1 <= block <= depth), or None when they do not fit the
        budget or block is 0 (nothing to reuse before the first block)."""
        if block <= 0 or self.block_bytes() > self.budget:
            return None
        if block in self._blocks:
            self._blocks.move_to_end(block)
            return self._blocks[block]
        start = max((k for k in self._blocks if k < block), default=0)
        tokens = self._run(start, block)
        size = tokens.numel() * tokens.element_size()
        while self._blocks and self.nbytes() + size > self.budget:
            self._blocks.popitem(last=False)
        self._blocks[block] = tokens
        return tokens

    def _run(self, start: int, block: int) -> Tensor:
        device = next(self.model.parameters()).device
        self.model.eval()
        out = []
        if start == 0:
            for x, _ in self.data.batches(self.batch_size, device):
                out.append(tokens_entering(self.model, embed(self.model, x), 0, block))
        else:
            cached = self._blocks[start]
            for i in range(0, cached.shape[0], self.batch_size):
                out.append(tokens_entering(self.model, cached[i:i + self.batch_size], start, block))
        self.computed_blocks += block - start
        return torch.cat(out)
