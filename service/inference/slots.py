"""Adapter slots: which resident adapter sits in which slot of the gathered LoRA layers.

An adapter is read from its registry directory on first use and written into a free slot of every
`GatheredLoRALinear` (wrapping the base model's Linear layers it targets the first time one does). When
no slot is free the least recently used adapter is evicted, unless it is pinned or a running row uses
it (`busy`, and the caller's `in_use`). Slot 0 is the base model and is never given out.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from torch import nn

from cltune.errors import EngineError, NotFoundError
from service.inference.lora import BatchRows, GatheredLoRALinear, read_lora
from service.inference.params import AdapterKey

log = logging.getLogger("cltune.engine")


class AdapterSlots:
    """The slots of one model's gathered LoRA layers and the LRU of adapters in them. Not thread-safe:
    the engine calls it under its lock."""

    def __init__(self, model: nn.Module, max_adapters: int, stats: dict[str, int]) -> None:
        """Args:
        model: the base model; its targeted Linear layers are replaced in place on first use.
        max_adapters: slots 1..max_adapters hold adapters.
        stats: counters "loads" and "evictions" are incremented here (the engine's stats).
        """
        self.model = model
        self.max_adapters = max_adapters
        self.stats = stats
        self.rows = BatchRows()  # the batch rows' slot ids, read by every gathered layer
        self.layers: dict[str, GatheredLoRALinear] = {}
        self.resident: OrderedDict[AdapterKey, int] = OrderedDict()  # LRU order: oldest first
        self.pinned: set[AdapterKey] = set()
        self.busy: set[int] = set()  # slots the continuous scheduler's running rows use: never evicted

    def evictable(self, in_use: set[int]) -> AdapterKey | None:
        """The least recently used resident adapter that is neither pinned nor used by a row."""
        busy = in_use | self.busy
        return next((k for k, s in self.resident.items() if k not in self.pinned and s not in busy), None)

    def slot_for(self, key: AdapterKey, in_use: set[int]) -> int:
        """The slot of `key`, loading it (and evicting the least recently used adapter) if needed.

        Raises:
            EngineError: every slot is pinned or in use, or the adapter cannot be served.
            NotFoundError: the adapter was deleted.
        """
        if key in self.resident:
            self.resident.move_to_end(key)
            return self.resident[key]
        used = set(self.resident.values())
        free = [s for s in range(1, self.max_adapters + 1) if s not in used]
        if not free:
            victim = self.evictable(in_use)
            if victim is None:
                raise EngineError(
                    f"all {self.max_adapters} adapter slots are pinned or in use",
                    max_adapters=self.max_adapters,
                )
            free = [self.resident.pop(victim)]
            self.stats["evictions"] += 1
            log.info("evict adapter %s/%s from slot %d", victim.tenant, victim.ref, free[0])
        self._load(key, free[0])
        self.resident[key] = free[0]
        return free[0]

    def _load(self, key: AdapterKey, slot: int) -> None:
        try:
            weights = read_lora(key.path)
        except FileNotFoundError as e:  # deleted between routing and loading
            raise NotFoundError(
                f"adapter {key.ref} of tenant {key.tenant} is gone: {e}", adapter=key.ref
            ) from e
        except (OSError, ValueError, KeyError) as e:
            raise EngineError(f"loading adapter {key.ref} failed: {e}", adapter=key.ref) from e
        named = dict(self.model.named_modules())
        for module in weights:
            if module not in self.layers:
                self._wrap(module, named.get(module))
        for module, layer in self.layers.items():
            a, b = weights.get(module, (None, None))
            layer.set_slot(slot, a, b)
        self.stats["loads"] += 1
        log.info("load adapter %s/%s into slot %d (%d layers)", key.tenant, key.ref, slot, len(weights))

    def _wrap(self, name: str, module: nn.Module | None) -> None:
        if not isinstance(module, nn.Linear):
            raise EngineError(f"adapter targets {name!r}, which is not a Linear layer of the base model")
        parent_name, _, child = name.rpartition(".")
        layer = GatheredLoRALinear(module, self.rows, self.max_adapters + 1)
        setattr(self.model.get_submodule(parent_name), child, layer)
        self.layers[name] = layer
