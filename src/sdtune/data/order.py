"""Exact data position: the order of each epoch is a pure function of (seed, epoch).

Written by hand because a DataLoader's sampler state cannot say "epoch 3, sample 412 of its
shuffled order"; with this, a resume neither replays nor skips a sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch


def derive_seed(*parts: int | str) -> int:
    """A well-mixed 63-bit seed from a tuple of ints/strings (numpy's SeedSequence hashing)."""
    ints = [p if isinstance(p, int) else int.from_bytes(p.encode(), "little") for p in parts]
    state = np.random.SeedSequence([abs(i) for i in ints]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def generator(*parts: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from `derive_seed(*parts)`."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


@dataclass(frozen=True)
class DataPosition:
    """Where the next batch starts: `index` samples of epoch `epoch`'s order are consumed."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class BucketIds(tuple):
    """Each example's bucket (data.buckets), hashed and compared by identity: the epoch
    order's cache then costs nothing per step, where a plain tuple of 100k ids would be hashed
    on every call."""

    __slots__ = ()

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other) -> bool:
        return self is other

    def __ne__(self, other) -> bool:
        return self is not other


@lru_cache(maxsize=4)
def epoch_order(
    num_examples: int,
    seed: int,
    epoch: int,
    buckets: tuple[int, ...] | None = None,
    group: int = 1,
    paired: int | None = None,
) -> tuple[int, ...]:
    """The shuffled order of the examples in `epoch`. With `buckets` (each example's bucket),
    the same shuffle dealt into its buckets: each time a bucket holds `group` examples (a
    global batch) they come next, so every global batch is of one bucket; what is left in a
    bucket at the end of the epoch waits for the next epoch's shuffle. One bucket gives the
    plain order exactly.

    With `paired` = P, examples 0..P-1 and P..N-1 are two kinds (DreamBooth's instance and
    class images), each shuffled on its own and dealt in turn: every two consecutive examples
    are one of each while both last, so a batch of even size holds as many of one as of the
    other, every step, as DreamBooth's paired batches do (a plain shuffle of both would leave
    a step of 20 anywhere from 6 to 14 instance images)."""
    gen = generator(seed, "order", epoch)
    if paired is None:
        perm = torch.randperm(num_examples, generator=gen).tolist()
    else:
        first = torch.randperm(paired, generator=gen).tolist()
        second = [paired + i for i in torch.randperm(num_examples - paired, generator=gen).tolist()]
        both = min(len(first), len(second))
        perm = [i for pair in zip(first, second) for i in pair]
        perm += first[both:] + second[both:]
    if buckets is None:
        return tuple(perm)
    pending: dict[int, list[int]] = {}
    order: list[int] = []
    for i in perm:
        waiting = pending.setdefault(buckets[i], [])
        waiting.append(i)
        if len(waiting) == group:
            order += waiting
            waiting.clear()
    return tuple(order)


def next_batch(
    position: DataPosition,
    batch_size: int,
    num_examples: int,
    seed: int,
    shard: tuple[int, int] = (0, 1),
    buckets: tuple[int, ...] | None = None,
    paired: int | None = None,
) -> tuple[list[tuple[int, int]], DataPosition]:
    """Keys (epoch, example index) of the batch at `position`, and the position after it.

    An epoch's last partial batch is dropped so that every batch has the same shape; the order
    changes each epoch, so no example is left out every time. With several processes, `shard`
    (rank, world): the global batch holds `batch_size` examples per process, process `rank`
    gets its own slice of it, and all of them move to the same position after it. With
    `buckets` (each example's aspect-ratio bucket), every global batch is of one bucket. With
    `paired`, the two kinds of example alternate (see epoch_order).
    """
    rank, world = shard
    total = batch_size * world
    epoch, index = position.epoch, position.index
    group = total if buckets is not None else 1
    order = epoch_order(num_examples, seed, epoch, buckets, group, paired)
    if index + total > len(order):
        epoch, index = epoch + 1, 0
        order = epoch_order(num_examples, seed, epoch, buckets, group, paired)
    start = index + rank * batch_size
    keys = [(epoch, order[i]) for i in range(start, start + batch_size)]
    return keys, DataPosition(epoch, index + total)
