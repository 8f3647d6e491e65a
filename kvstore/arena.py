"""A first-fit byte allocator over one preallocated pool, with coalescing of free ranges.

The CPU tier keeps every object contiguous in one pool so that a get is a single memcpy.
Free ranges are kept sorted by offset; allocation is first fit (O(free ranges)), freeing
merges with both neighbours, so fragmentation stays bounded by what live objects pin down.
"""

from __future__ import annotations

import bisect

ALIGNMENT = 256  # every allocation starts on a 256-byte boundary: safe for any dtype view


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


class Arena:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity // ALIGNMENT * ALIGNMENT
        self._starts: list[int] = [0] if self.capacity else []  # sorted free-range starts
        self._sizes: dict[int, int] = {0: self.capacity} if self.capacity else {}
        self.used = 0

    def allocate(self, size: int) -> int | None:
        """Offset of a free range of ``size`` bytes (rounded up to ALIGNMENT), or None."""
        size = align_up(max(size, 1))
        for i, start in enumerate(self._starts):
            free = self._sizes[start]
            if free >= size:
                del self._sizes[start]
                if free == size:
                    del self._starts[i]
                else:
                    self._starts[i] = start + size
                    self._sizes[start + size] = free - size
                self.used += size
                return start
        return None

    def free(self, offset: int, size: int) -> None:
        size = align_up(max(size, 1))
        self.used -= size
        i = bisect.bisect_left(self._starts, offset)
        # Merge with the following free range.
        if i < len(self._starts) and self._starts[i] == offset + size:
            size += self._sizes.pop(self._starts[i])
            del self._starts[i]
        # Merge with the preceding free range.
        if i > 0 and self._starts[i - 1] + self._sizes[self._starts[i - 1]] == offset:
            self._sizes[self._starts[i - 1]] += size
            return
        self._starts.insert(i, offset)
        self._sizes[offset] = size

    @property
    def largest_free(self) -> int:
        return max(self._sizes.values(), default=0)
