"""Position-indexed key/value cache for diffusion decoding.

Slot ``s`` of the cache holds the keys and values of canvas column ``s`` (prompt + generation).
A forward pass that feeds tokens at slots ``S`` writes their fresh K/V into those slots and
marks them valid; its queries attend to every valid slot. Because writes are indexed by
position rather than appended, one object serves every caching policy: a prefix (feed only the
tail), a suffix (dual cache), a block at a time (exact block cache), or arbitrary positions
(delayed cache). Attending over slots is the same computation as attending over the
concatenated sequence, so a cache that holds the K/V a full forward would compute gives the
full forward's output exactly.

A *static* cache (:meth:`KVCache.make_static`, used by compiled decoding) keeps every shape fixed:
attention reads all ``max_len`` slots (the never-written ones are masked out) instead of the
``[0, filled)`` prefix, and the buffers keep their addresses (CUDA graphs replay over them).
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # [B, S]
        self.filled = 0  # slots [filled, S) were never written: attention reads only [0, filled)
        self.static = False  # attention reads all S slots; buffers keep their addresses (make_static)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int) -> KVCache:
        cfg = model.config
        param = next(model.parameters())
        return cls(
            cfg.num_hidden_layers,
            batch_size,
            max_len,
            cfg.num_key_value_heads,
            cfg.head_dim,
            dtype=param.dtype,
            device=param.device,
        )

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    @property
    def attended(self) -> int:
        """Attention reads slots ``[0, attended)``: the written prefix, or every slot of a static cache."""
        return self.max_len if self.static else self.filled

    def make_static(self) -> KVCache:
        """Fix every shape and address (compiled decoding): attention reads all slots, masked by
        ``valid``, and the buffers are marked as static addresses for CUDA graphs."""
        self.static = True
        for buffer in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(buffer)
        return self

    def check_slots(self, slots_BT: Tensor) -> None:
        if slots_BT.shape[0] != self.valid.shape[0]:
            raise ValueError(f"cache holds batch {self.valid.shape[0]}, got slots for batch {slots_BT.shape[0]}")
        if slots_BT.numel() and (slots_BT.min() < 0 or slots_BT.max() >= self.max_len):
            raise ValueError(f"cache slots must lie in [0, {self.max_len}); got {slots_BT.min()}..{slots_BT.max()}")

    def mark_valid(self, slots_BT: Tensor) -> None:
        self.valid.scatter_(1, slots_BT, True)
        if slots_BT.numel() and not self.static:  # a static cache reads every slot: no host sync
            self.filled = max(self.filled, int(slots_BT.max()) + 1)

    def reindex(self, index: Tensor) -> None:
        """Row ``i`` of every buffer becomes row ``index[i]`` (resampled decoding particles)."""
        index = index.to(self.valid.device)
        if self.static:  # in place: the buffers keep their addresses
            for buffer in (*self.keys, *self.values, self.valid):
                buffer.copy_(buffer[index])
            return
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
        self.valid = self.valid[index]

    def update(self, layer: int, k_BHTD: Tensor, v_BHTD: Tensor, slots_BT: Tensor) -> tuple[Tensor, Tensor]:
        """Write this layer's fresh K/V at ``slots``; return the buffers ``[B, H, filled, D]``."""
        index = slots_BT[:, None, :, None].expand_as(k_BHTD)
        self.keys[layer].scatter_(2, index, k_BHTD.to(self.keys[layer].dtype))
        self.values[layer].scatter_(2, index, v_BHTD.to(self.values[layer].dtype))
        if self.static:
            return self.keys[layer], self.values[layer]
        return self.keys[layer][:, :, : self.filled], self.values[layer][:, :, : self.filled]
