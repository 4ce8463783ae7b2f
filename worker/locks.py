"""Coordination of workers through Redis: per-instance locks and counts, per-message start
counts."""

from __future__ import annotations

from typing import Final

import redis

KEY_PREFIX: Final = "coronet:"
ATTEMPTS_TTL_S: Final = 7 * 24 * 3600
"""How long Redis remembers how often a task message was started."""

_RELEASE_SCRIPT: Final = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class InstanceLocks:
    """Per-instance locks in Redis, so that two workers never analyse one instance at once.

    A lock is owned by a task id and expires after ``ttl_s`` (longer than the task time limit),
    so a lock of a killed worker goes away.  A redelivered message has the same task id and
    takes its own lock over at once.
    """

    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        self._client = client
        self._ttl_ms = int(ttl_s * 1000)
        self._release = client.register_script(_RELEASE_SCRIPT)

    @staticmethod
    def _name(study_key: str, instance_key: str) -> str:
        return f"{KEY_PREFIX}lock:{study_key}:{instance_key}"

    def acquire(self, study_key: str, instance_key: str, owner: str) -> bool:
        name = self._name(study_key, instance_key)
        if self._client.set(name, owner, nx=True, px=self._ttl_ms):
            return True
        holder = self._client.get(name)
        if holder is not None and _text(holder) == owner:
            return bool(self._client.set(name, owner, xx=True, px=self._ttl_ms))
        return False

    def release(self, study_key: str, instance_key: str, owner: str) -> None:
        self._release(keys=[self._name(study_key, instance_key)], args=[owner])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class AttemptCounter:
    """Counts how often one task message was started (first run plus redeliveries)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def count(self, task_id: str, retries: int) -> int:
        name = f"{KEY_PREFIX}attempts:{task_id}:{retries}"
        with self._client.pipeline() as pipe:
            pipe.incr(name)
            pipe.expire(name, ATTEMPTS_TTL_S)
            attempts, _ = pipe.execute()
        return int(attempts)


class InstanceCounter:
    """A count per spooled instance in Redis, e.g. how often its analysis started or its file
    could not be read; kept for :data:`ATTEMPTS_TTL_S` after the last change."""

    def __init__(self, client: redis.Redis, kind: str) -> None:
        self._client = client
        self._kind = kind

    def _name(self, study_key: str, instance_key: str) -> str:
        return f"{KEY_PREFIX}{self._kind}:{study_key}:{instance_key}"

    def increment(self, study_key: str, instance_key: str) -> int:
        """Add one and return the new count."""
        name = self._name(study_key, instance_key)
        with self._client.pipeline() as pipe:
            pipe.incr(name)
            pipe.expire(name, ATTEMPTS_TTL_S)
            count, _ = pipe.execute()
        return int(count)

    def get(self, study_key: str, instance_key: str) -> int:
        """The count (0 when none was kept)."""
        return int(self._client.get(self._name(study_key, instance_key)) or 0)

    def reset(self, study_key: str, instance_key: str) -> None:
        self._client.delete(self._name(study_key, instance_key))


class InstanceCounters:
    """The per-instance counts the study processor keeps: analysis starts and failed reads."""

    def __init__(self, client: redis.Redis) -> None:
        self.starts = InstanceCounter(client, "starts")
        self.read_failures = InstanceCounter(client, "read-failures")
