"""Maglev consistent hashing: the per-service lookup table the BPF side reads. Pure: no I/O.

Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer",
NSDI 2016, section 3.4 -- the same table Cilium and Katran fill into a BPF map.
A flow's hash picks a slot, ``table[hash % size]`` is an index into the service's
backend list. The control plane computes the table here; the dataplane stores one
value per slot: ``size * 4`` bytes per service port as a ``__u32`` backend index (64 KiB
at the default size), ``size * 8`` as ``struct backend_addr`` (what ctl/dataplane/reconcile.py
writes today: 128 KiB).

Public API::

    TABLE_SIZE = 16381
    table(backends, size=TABLE_SIZE, weights=None) -> list[int]
    disruption(old, old_backends, new, new_backends) -> float
    table_size_for(backend_count) -> int     # the size ctl/dataplane/desired.py asks for

Callers pass a STABLE, SORTED list of backend identities (e.g. ``"10.244.1.5:8080"``),
and the same list (same order) to the BPF map, because table entries are indexes
into it. Which backend gets which slot depends only on those names and their
order, never on the process: the slot preferences come from BLAKE2b, not
Python's per-process ``hash()``.

Why the table size is 16381 and not 1021
----------------------------------------
The populate loop hands out slots in rounds (one per backend per round), so with
N backends every backend ends up with floor(M/N) or ceil(M/N) slots -- the best
any integer table can do. With M = q*N + r (0 < r < N), the relative error from the
fair share M/N is max(r, N - r) / M, which can be as large as (N - 1) / M.

* "each backend's share within 5% of fair for 1..100 backends" needs
  max(r, N - r) <= 0.05 * M for every N <= 100. M = 1021 misses (N = 93:
  1021 = 10*93 + 91, so 10 slots instead of 10.98, 8.9% off). The smallest prime
  that meets it is 1811 (worst 4.9%, at N = 95).
* "adding or removing one backend moves at most 1/N + 2% of the slots" is the
  binding constraint: Maglev's extra (non-minimal) disruption shrinks only like
  1/sqrt(M). Worst measured excess over 1/N, N in 2..100, adding a backend or
  removing the first, middle or last one, over 3-8 sets of backend names:
  1811: 4.7%, 4093: 3.5%, 8191: 2.2% (all over budget), 10007: 1.96% (passes,
  but with no margin: it would depend on the names), 12289: 1.8%, 16381: 1.5%.

So TABLE_SIZE = 16381, Cilium's default: the smallest of the prime sizes Cilium
offers (largest prime below a power of two: 251, 509, 1021, 2039, 4093, 8191,
16381, 32749, 65521, 131071) that meets both, with 0.5% to spare on disruption.
Worst balance error at N <= 100 is 0.55% (N = 91). Memory per service port:
16381 * 4 = 65,524 bytes (64 KiB) as __u32 slots, 131,048 bytes (128 KiB) as the
8-byte struct backend_addr. The paper recommends M > 100 * N anyway;
for more than ~160 backends pick a larger prime (32749, 65521) through ``size``.

Hashes
------
offset = h1(name) % M in [0, M-1], skip = h2(name) % (M-1) + 1 in [1, M-1], where
h1 and h2 are 64-bit BLAKE2b digests (hashlib, implemented in C, identical on every
machine, process and Python version) of the UTF-8 name under two different
personalisation strings: BLAKE2's built-in domain separation, which makes them two
independent hash functions. (Cilium and Katran use MurmurHash3 with two seeds, so
the tables are not bit-identical to theirs; they need not be, only this control
plane writes them.) Modulo bias is at most M / 2**64. Because M is prime, every
skip is coprime with M and backend i's preference list
``permutation[i][j] = (offset_i + j * skip_i) % M`` visits every slot once.

Populate loop (the paper's, unchanged)::

    next = [0] * N; entry = [-1] * M; n = 0
    while True:
        for i in range(N):                      # each backend in turn ...
            c = permutation[i][next[i]]
            while entry[c] >= 0:                # ... takes its next preferred free slot
                next[i] += 1
                c = permutation[i][next[i]]
            entry[c] = i; next[i] += 1; n += 1
            if n == M: return entry             # until the table is full

Weights (optional, default 1): a backend of weight w takes w consecutive turns per
round instead of one, so its share is w / sum(weights) (to within w slots:
the last round may be cut short); weight 0 gets no turns and no slots (a draining backend).

Speed: permutations are never materialised. Each backend's "next preferred free
slot" is a lazy C-level iterator::

    filterfalse(entry.__getitem__, map(M.__rmod__, range(offset, offset + skip * M, skip)))

``filterfalse`` tests a slot when ``next()`` is called, so it sees the table as it is
at that turn (the inner while loop above) and remembers where it stopped
(``next[i]``). The loop therefore costs one Python step per slot plus about
M * ln(M) probes that run in C (never O(M^2)). Measured on CPython 3.11: 10 000
tables of 10 backends take about 2.3 s at M = 1021 and about 40 s at M = 16381
(there, merely building the 164 million output ints costs seconds): recompute only
the services whose backends changed.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from itertools import cycle, filterfalse, islice
from operator import invert, ne

__all__ = ["TABLE_SIZE", "disruption", "fast_table", "preferences", "table", "table_size_for"]

TABLE_SIZE = 16381  # prime; as __u32 slots 65,524 bytes (64 KiB) per service port

# Cilium's prime sizes from the default up (largest prime below a power of two).
_LARGER_SIZES = (16381, 32749, 65521, 131071)

# BLAKE2b personalisation strings (at most 16 bytes): two independent hash functions.
_OFFSET_PERSON = b"atomnet/mglv/off"
_SKIP_PERSON = b"atomnet/mglv/skp"


@lru_cache(maxsize=64)
def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    d = 3
    while d * d <= n:
        if n % d == 0:
            return False
        d += 2
    return True


@lru_cache(maxsize=1 << 16)
def permutation(name: str, size: int) -> tuple[int, int]:
    """(offset, skip) of a backend's preference list in a table of `size` slots (the Maglev
    paper's: slot j of its list is (offset + j * skip) % size; skip is never 0)."""
    h1, h2 = _hashes(name)
    return h1 % size, h2 % (size - 1) + 1


def _hashes(name: str) -> tuple[int, int]:
    """Two independent, stable 64-bit hashes of a backend name (cached: names recur)."""
    data = name.encode("utf-8")
    h1 = hashlib.blake2b(data, digest_size=8, person=_OFFSET_PERSON).digest()
    h2 = hashlib.blake2b(data, digest_size=8, person=_SKIP_PERSON).digest()
    return int.from_bytes(h1, "big"), int.from_bytes(h2, "big")


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"maglev table size must be an int, got {size!r}")
    if not _is_prime(size):
        raise ValueError(f"maglev table size must be prime, got {size}")
    return size


def _turns(backends: Sequence[str], weights: Mapping[str, int] | None) -> list[int]:
    """Turns per round for each backend, validated."""
    if weights is None:
        return [1] * len(backends)
    unknown = set(weights) - set(backends)
    if unknown:
        raise ValueError(f"weights for unknown backends: {sorted(map(str, unknown))}")
    turns = []
    for name in backends:
        w = weights.get(name, 1)
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"weight of {name!r} must be an int, got {w!r}")
        if w < 0:
            raise ValueError(f"weight of {name!r} must be >= 0, got {w}")
        turns.append(w)
    if not any(turns):
        raise ValueError("at least one backend needs a weight > 0")
    return turns


def table(backends: Sequence[str], size: int = TABLE_SIZE,
          weights: Mapping[str, int] | None = None) -> list[int]:
    """The Maglev lookup table: ``size`` entries, each an index into ``backends``.

    ``backends``: the service's backend identities, e.g. ``"10.244.1.5:8080"``. The
    caller passes a stable, sorted list without duplicates (and programs the BPF
    backend list in the same order); this function does not sort it, because the
    returned indexes refer to the list as given.
    ``size``: a prime >= len(backends); ValueError otherwise (checked even when
    ``backends`` is empty).
    ``weights``: optional name -> non-negative int (missing names weigh 1); a backend
    of weight w takes w turns per round.

    No backends: ``[]``.
    """
    size = _check_size(size)
    n = len(backends)
    if n == 0:
        return []
    if n > size:
        raise ValueError(f"maglev table size {size} is smaller than the {n} backends")
    for name in backends:
        if not isinstance(name, str):
            raise TypeError(f"backend identities must be str, got {name!r}")
    if len(set(backends)) != n:
        raise ValueError("duplicate backend identities")
    turns = _turns(backends, weights)

    # entry[c] == 0: slot c is free; otherwise it holds ~i (never 0) for backend i,
    # so the table itself is the "is taken" predicate of every backend's iterator.
    entry = [0] * size
    rmod = size.__rmod__  # rmod(x) == x % size
    order = []  # one (next-free-preferred-slot, mark) pair per turn of a round
    for i, name in enumerate(backends):
        if not turns[i]:
            continue
        offset, skip = permutation(name, size)
        preferred = map(rmod, range(offset, offset + skip * size, skip))
        # (turns beyond `size` would never be reached: cap them, whatever the weight)
        order.extend([(filterfalse(entry.__getitem__, preferred).__next__, ~i)] * min(turns[i], size))
    # Each turn claims exactly one slot (a backend's permutation covers every slot,
    # so its iterator cannot run dry while the table has a free slot): `size` turns
    # fill the table.
    for next_free, mark in islice(cycle(order), size):
        entry[next_free()] = mark
    return list(map(invert, entry))


def preferences(backends: Sequence[str], size: int):
    """(offsets, skips): each backend's permutation as two ctypes uint64 arrays, the input of
    the compiled populate loop (ctl/dataplane/native/maglev.c)."""
    import ctypes as ct
    n = len(backends)
    offsets, skips = (ct.c_uint64 * n)(), (ct.c_uint64 * n)()
    for i, name in enumerate(backends):
        offsets[i], skips[i] = permutation(name, size)
    return offsets, skips


def fast_table(backends: Sequence[str], size: int = TABLE_SIZE) -> list[int]:
    """``table(backends, size)`` (unweighted) computed by the compiled loop: the same slots,
    about a hundred times faster. What the daemon uses; ``table`` stays the readable reference."""
    import ctypes as ct
    from .native import lib
    size = _check_size(size)
    if not backends:
        return []
    if len(backends) > size:
        raise ValueError(f"maglev table size {size} is smaller than the {len(backends)} backends")
    offsets, skips = preferences(backends, size)
    out = (ct.c_int32 * size)()
    rc = lib().maglev_populate(len(backends), offsets, skips, size, out)
    if rc:
        raise ValueError(f"maglev populate failed: {rc}")
    return list(out)


def table_size_for(backend_count: int) -> int:
    """The table size for a service with ``backend_count`` backends.

    TABLE_SIZE up to TABLE_SIZE // 100 = 163 backends; above that the smallest of
    32749, 65521, 131071 that keeps the paper's M >= 100 * N, and 131071 beyond
    1310 backends (fewer slots per backend, still valid up to 131071 backends).
    Crossing a step changes the size, which reshuffles that service's whole table.
    """
    if backend_count < 0:
        raise ValueError(f"backend count must be >= 0, got {backend_count}")
    for size in _LARGER_SIZES:
        if size >= 100 * backend_count:
            return size
    if backend_count > _LARGER_SIZES[-1]:
        raise ValueError(f"{backend_count} backends do not fit a Maglev table of at most {_LARGER_SIZES[-1]} slots")
    return _LARGER_SIZES[-1]


def disruption(old: Sequence[int], old_backends: Sequence[str],
               new: Sequence[int], new_backends: Sequence[str]) -> float:
    """Fraction of slots whose backend identity changed from ``old`` to ``new``.

    Slots are compared by identity (``old_backends[old[k]]`` against
    ``new_backends[new[k]]``), not by index, so renumbering alone is no disruption.
    Both empty: 0.0; one empty (a service gaining its first or losing its last
    backend): 1.0. Tables of different non-zero sizes: ValueError.
    """
    if not old and not new:
        return 0.0
    if not old or not new:
        return 1.0
    if len(old) != len(new):
        raise ValueError(f"tables of different sizes: {len(old)} and {len(new)}")
    changed = sum(map(ne, map(old_backends.__getitem__, old), map(new_backends.__getitem__, new)))
    return changed / len(old)
