"""Ranks for data-parallel training: read torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``.

Nothing shards by itself: pass the values on explicitly, e.g.
``ds.batch_iterator(64, shuffle=rng, **shard_from_env())``. Every rank must pass an RNG
in the same state (the same seed), so that all ranks cut the same global stream.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

__all__ = ["RankInfo", "rank_from_env", "shard_from_env"]


@dataclasses.dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} should be an integer, got {value!r}") from None


def rank_from_env(env: Mapping[str, str] | None = None) -> RankInfo | None:
    """This process's rank as torchrun (or a launcher setting the same variables) gives it;
    ``None`` when ``RANK`` and ``WORLD_SIZE`` are not set."""
    env = os.environ if env is None else env
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    if "RANK" not in env or "WORLD_SIZE" not in env:
        raise ValueError("set both $RANK and $WORLD_SIZE (or neither)")
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"$RANK should be in [0, $WORLD_SIZE), got RANK={rank}, WORLD_SIZE={world}")
    local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    return RankInfo(rank, world, local)


def shard_from_env(env: Mapping[str, str] | None = None) -> dict[str, int]:
    """``{"rank": r, "world_size": w}`` from the environment, or ``{}`` (no sharding)."""
    info = rank_from_env(env)
    return {} if info is None else {"rank": info.rank, "world_size": info.world_size}
