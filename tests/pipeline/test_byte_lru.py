"""The byte-budget LRU behind the LoRA and prompt caches."""

from __future__ import annotations

from pipeline.byte_lru import ByteBudgetLRU


def test_least_recently_used_go_first_and_oversized_entries_are_not_kept() -> None:
    cache: ByteBudgetLRU[str, bytes] = ByteBudgetLRU(10, len)
    made: list[str] = []

    def get(key: str, size: int) -> bytes:
        return cache.get(key, lambda: made.append(key) or b"x" * size)

    get("a", 4), get("b", 4), get("a", 4)  # a is now the more recent
    get("c", 4)  # 12 bytes: b goes
    get("a", 4), get("b", 4)  # a is kept, b is made again (and c goes)
    assert made == ["a", "b", "c", "b"]
    assert (cache.hits, cache.misses, cache.evictions) == (2, 4, 2)
    assert get("huge", 11) == b"x" * 11 and get("huge", 11) and made[-2:] == ["huge", "huge"]
    assert get("a", 4) and made[-1] == "huge"  # the oversized one pushed nothing out
