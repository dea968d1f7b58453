"""The store contract every backend implements: a small revisioned key-value
store with etcd v3 semantics.

The control plane keeps all of its desired and observed state here, so the
contract is deliberately the subset of etcd that the rest of atomnet relies on:
one global revision that every change bumps, per-key create/mod revisions and
versions, compare-and-swap, atomic multi-key transactions, prefix watches that
can resume from a revision, and leases whose expiry deletes keys (that is how
a dead host's registrations disappear). Keeping the contract this close to etcd
means the embedded sqlite backend and an etcd backend are interchangeable and
are checked by the same contract tests.

Keys and values are plain ``str``; values are JSON text written by callers and
never parsed by the store.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass

from ctl.errors import AtomnetError


@dataclass(frozen=True, slots=True)
class KV:
    """One key as stored, with the bookkeeping etcd keeps for it."""

    key: str
    value: str
    create_revision: int  # revision of the put that created the key
    mod_revision: int  # revision of the last change; the CAS token for replace()
    version: int  # 1 on creation, +1 on every put
    lease: int  # 0 = not attached to a lease


@dataclass(frozen=True, slots=True)
class Event:
    """One change seen by watch(); several events can share a revision (a transaction)."""

    type: str  # "put" | "delete"
    key: str
    value: str | None  # None for a delete
    revision: int


class StoreError(AtomnetError):
    """Any store failure; str(exc) is one readable line naming the store URL or path."""


class Compacted(StoreError):
    """watch() asked for history the store no longer keeps: list() again and watch from there."""


def split_batch(items: Iterable[tuple[str, str]], deletes: Iterable[str], where: str) -> tuple[dict, list]:
    """put_many's arguments, checked the same way by every backend: a key put twice keeps its
    last value; a key both put and deleted is an error (as in an etcd transaction)."""
    puts = dict(items)
    dels = sorted(set(deletes))
    both = puts.keys() & set(dels)
    if both:
        raise StoreError(f"put_many on {where}: key {min(both)!r} is both put and deleted")
    return puts, dels


class Store(abc.ABC):
    """A revisioned key-value store (etcd v3 semantics).

    Every change (put, delete, expiry of a lease with keys) bumps one global
    revision by 1; a call that changes several keys (put_many, delete_prefix,
    revoke) changes them all at one revision. Calls that change nothing do not
    bump the revision.
    """

    url: str

    @abc.abstractmethod
    def get(self, key: str) -> KV | None:
        """The key, or None if absent."""

    @abc.abstractmethod
    def list(self, prefix: str) -> tuple[list[KV], int]:
        """All keys starting with prefix, sorted by key, and the store revision they were read at.

        Watch from ``revision + 1`` to follow changes without missing any.
        """

    @abc.abstractmethod
    def put(self, key: str, value: str, lease: int = 0) -> int:
        """Set key; returns the new revision.

        With a lease the key is attached to it (deleted when it expires); a
        put without a lease detaches the key from any lease it had, as in etcd.
        StoreError if the lease does not exist.
        """

    @abc.abstractmethod
    def create(self, key: str, value: str, lease: int = 0) -> bool:
        """Create key only if absent; False (and nothing changes) if it exists.

        Exactly one of several racing creators wins: this is the election and
        allocation primitive.
        """

    @abc.abstractmethod
    def replace(self, key: str, value: str, mod_revision: int, lease: int = 0) -> bool:
        """Compare-and-swap: set key only if its mod_revision is still the given one.

        False if the key changed since it was read or is gone.
        """

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Delete key; True if it existed."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete all keys under prefix at one revision; the number deleted."""

    @abc.abstractmethod
    def put_many(self, items: Iterable[tuple[str, str]], deletes: Iterable[str] = ()) -> int:
        """Put items and delete keys in one atomic transaction at one revision.

        Keys are put without a lease. Returns the new revision (the current one
        if nothing changed). A key both put and deleted is a StoreError, as in
        etcd. Must handle tens of thousands of items quickly: full resyncs use it.
        """

    @abc.abstractmethod
    def revision(self) -> int:
        """The current store revision."""

    @abc.abstractmethod
    def watch(self, prefix: str, start_revision: int, timeout: float) -> list[Event]:
        """Events on keys under prefix with revision >= start_revision, in revision order.

        Blocks until there is at least one, or until timeout seconds pass (then
        returns []). Raises Compacted if start_revision is older than the kept
        history. To resume, watch again from the last event's revision + 1.
        """

    @abc.abstractmethod
    def compact(self, revision: int) -> None:
        """Drop watch history older than revision (etcd compaction).

        Watching from a revision below it then raises Compacted. StoreError if
        revision is in the future.
        """

    @abc.abstractmethod
    def grant(self, ttl: float) -> int:
        """A new lease id that expires ttl seconds from now unless refreshed."""

    @abc.abstractmethod
    def refresh(self, lease: int) -> None:
        """Keepalive: restart the lease's TTL. StoreError if it expired or is unknown."""

    @abc.abstractmethod
    def revoke(self, lease: int) -> None:
        """End the lease now, deleting its keys (with delete events).

        Revoking an expired or unknown lease does nothing: the keys are gone
        either way, and shutdown paths should not fail over it.
        """

    @abc.abstractmethod
    def lease_ttl(self, lease: int) -> float | None:
        """Seconds left on the lease, None if it expired or is unknown."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection; the store must not be used afterwards."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
