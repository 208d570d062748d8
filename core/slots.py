"""Where adapters live: a fixed-capacity table of slot indices (the ids that routing speaks of)."""

from __future__ import annotations

from core.errors import CapacityExceededError, InvalidArgumentError


class SlotTable:
    """Slots 0..capacity-1; the lowest free slot is handed out first. Invariant: len(used) <= capacity."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise InvalidArgumentError(f"max_adapters must be >= 1 (got {capacity})", field="max_adapters")
        self.capacity = capacity
        self._owner: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._owner)

    @property
    def full(self) -> bool:
        return len(self._owner) >= self.capacity

    def acquire(self, owner: str) -> int:
        for slot in range(self.capacity):
            if slot not in self._owner:
                self._owner[slot] = owner
                return slot
        raise CapacityExceededError(f"all {self.capacity} adapter slots are in use", field="max_adapters")

    def release(self, slot: int) -> None:
        self._owner.pop(slot, None)

    def owner(self, slot: int) -> str | None:
        return self._owner.get(slot)
