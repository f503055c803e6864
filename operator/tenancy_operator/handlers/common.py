"""What every kind's handlers share."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import kopf

from tenancy_operator import GROUP, VERSION
from tenancy_operator.api.common import ApiModel
from tenancy_operator.conditions import merge, readiness
from tenancy_operator.observability.logging import get_logger
from tenancy_operator.reconcilers.errors import Verdict
from tenancy_operator.status_writer import StatusWriter
from tenancy_operator.watch_cache import compact

WATCH_HANDLER_ID = "watch"
"""Id of every Kopf on.event handler: they run for each watch event of their kind."""
F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S")
log = get_logger(__name__)


def owned(body: kopf.Body, memo: kopf.Memo, **_: Any) -> bool:
    """This replica reconciles the object (always, unsharded): a sharded replica's watch brings only
    its slices, except for kinds watched whole (runtime.SHARDED_PLURALS), which this filters."""
    ctx = getattr(memo, "ctx", None)
    return ctx is None or bool(ctx.ownership.owns(body))


def on_reconcile(registry: kopf.OperatorRegistry, plural: str) -> Callable[[F], F]:
    """One level-based reconcile as Kopf's resume, create and update handler of a kind (one id, so
    Kopf tracks it as one handler whichever cause comes), for the objects this replica owns."""

    def decorate(fn: F) -> F:
        for on in (kopf.on.update, kopf.on.create, kopf.on.resume):
            on(GROUP, VERSION, plural, registry=registry, id="reconcile", when=owned)(fn)
        return fn

    return decorate


def record_status(body: Mapping[str, Any], out: Verdict, record: ApiModel | None) -> dict[str, Any]:
    """The status of a kind whose reconcile returns a verdict and a record (its typed status model):
    conditions from the verdict, the record's fields, and null for fields the record no longer has
    (a merge patch then removes them). No record: the conditions only, the rest as it was.
    ``write_record`` writes it."""
    generation = int(body["metadata"].get("generation") or 0)
    conds, drop = readiness(out.ready, out.stalled, out.reason, out.message)
    old = body.get("status") or {}
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": merge(old.get("conditions"), conds, generation, drop=drop),
    }
    if record is not None:
        fields = record.model_dump(mode="json", exclude_none=True, exclude={"conditions", "observed_generation"})
        status.update({k: None for k in old if k not in REPORT_KEYS})
        status.update({k: v for k, v in type(record).with_nulls(fields).items() if k not in REPORT_KEYS})
    return status


REPORT_KEYS = ("conditions", "observedGeneration")
"""A record kind's status keys that report the reconcile; the others are the record."""


async def write_record(status: StatusWriter, plural: str, body: Mapping[str, Any], out: Verdict,
                       record: ApiModel | None, written: Callable[[Mapping[str, Any]], None] | None = None) -> bool:
    """Write ``record_status``: the record's fields as one decision (``conditions.status_patch``'s
    ``whole``), as ``body``'s status may be older than this process's last write. False: gone."""
    desired = record_status(body, out, record)
    return await status.write(plural, body, desired, whole=[k for k in desired if k not in REPORT_KEYS],
                              written=written)


class Rechecks:
    """Objects that want another look at a time of their own (running rollouts: a gate to read,
    a step or wave due): one loop for the kind, at most ``limit`` looks at once. ``check(key)``
    looks (and, through the reconcile, schedules the next); one that raises is looked at again
    after ``retry_seconds``."""

    def __init__(self, check: Callable[[tuple[str, str]], Awaitable[None]], retry_seconds: float,
                 limit: int = 16, per_namespace: int = 2) -> None:
        self._check = check
        self._retry = retry_seconds
        self._limit = limit
        self._per_namespace = per_namespace
        self._namespaces: dict[str, asyncio.Semaphore] = {}
        """A namespace's looks run at most ``per_namespace`` at once, and take a shared slot only when
        it is their turn: a namespace with a thousand rollouts slows its own, not the others'."""
        self._due: dict[tuple[str, str], float] = {}
        """(namespace, name) -> loop time of its next look."""
        self._wake = asyncio.Event()

    def schedule(self, key: tuple[str, str], check_in: float | None) -> None:
        """Look at ``key`` again in ``check_in`` seconds (None: not on a clock any more)."""
        if check_in is None:
            self._due.pop(key, None)
            return
        self._due[key] = asyncio.get_running_loop().time() + check_in
        self._wake.set()

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(self._limit)

        async def look(key: tuple[str, str]) -> None:
            own = self._namespaces.setdefault(key[0], asyncio.Semaphore(self._per_namespace))
            async with own, limit:
                try:
                    await self._check(key)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("recheck failed", namespace=key[0], name=key[1], error=type(exc).__name__,
                                status=getattr(exc, "status", None))
                    self._due.setdefault(key, loop.time() + self._retry)

        running: set[asyncio.Task[None]] = set()
        try:
            await self._loop(look, running)
        finally:  # shutdown: no look outlives the clients it uses
            for task in running:
                task.cancel()

    async def _loop(self, look: Callable[[tuple[str, str]], Coroutine[Any, Any, None]],
                    running: set[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            upcoming = min(self._due.values(), default=None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(),
                                       timeout=None if upcoming is None else max(0.0, upcoming - loop.time()))
            now = loop.time()
            due = [k for k, when in self._due.items() if when <= now]
            for key in due:  # in flight until its look schedules the next: one look per key at a time
                del self._due[key]
                task = asyncio.create_task(look(key))
                running.add(task)
                task.add_done_callback(running.discard)


def services(kind: str, cls: type[S]) -> Callable[[Any], S]:
    """How a kind's handlers find its service (``cls``), made at start-up (runtime.py) and kept in
    Kopf's memo (``memo.services[kind]``)."""

    def service(memo: Any) -> S:
        svc: S = memo.services[kind]
        return svc

    return service


class Reconciles(Protocol):
    async def run(self, body: Mapping[str, Any], retry: int) -> None: ...


R = TypeVar("R", bound=Reconciles)


def reconciled_by(registry: kopf.OperatorRegistry, kind: str, plural: str, cls: type[R]) -> Callable[[Any], R]:
    """How the kind's handlers find its service (``services``), with the kind's reconcile
    (``on_reconcile``) registered as a call to the service's ``run``."""
    service = services(kind, cls)

    @on_reconcile(registry, plural)
    async def reconcile(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
        await service(memo).run(body, retry)

    return service


def backoff(retry: int) -> float:
    """Delay before Kopf's next retry: exponential with jitter, 1, 2, 4 ... 60 s."""
    return min(60.0, 2.0 ** min(retry, 6)) * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto


@dataclass(frozen=True)
class _Written:
    """A progress annotation this process put in a patch for Kopf to apply."""

    patch: weakref.ref[kopf.Patch]
    earlier: bool
    """Also put in an earlier patch, one Kopf has sent since."""

    def before(self, patch: kopf.Patch) -> bool:
        """Sent to the API server before ``patch`` (not only stored in ``patch`` itself)."""
        return self.earlier or self.patch() is not patch


class PurgingProgressStorage(kopf.AnnotationsProgressStorage):
    """Kopf's progress annotations (a handler's retries), removed once the handler is done even when
    Kopf ran it on a body older than the annotation.

    Kopf purges only the annotations the body it acts on shows. Past the consistency timeout
    (runtime.py) it acts on the body it has, which can predate its own retry patch: a handler that
    then succeeds would leave its retry record on the object, a stale annotation a user sees and
    one PATCH at the next start. So an annotation this process sent in an earlier patch is purged
    too (removing one already gone changes nothing); one only stored in the patch being built is
    dropped from it, as Kopf does, so a handler done at its first run costs no write.
    """

    def __init__(self, *, prefix: str) -> None:
        super().__init__(prefix=prefix)
        self._written: dict[str, dict[str, _Written]] = {}
        """uid -> annotation key -> this process's last write of it, until purged."""

    def store(self, *, key: Any, record: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        super().store(key=key, record=record, body=body, patch=patch)
        if not body.metadata.uid:
            return
        written = self._written.setdefault(str(body.metadata.uid), {})
        for full_key in self.make_keys(key, body=body):
            last = written.get(full_key)
            written[full_key] = _Written(weakref.ref(patch), last is not None and last.before(patch))

    def purge(self, *, key: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        super().purge(key=key, body=body, patch=patch)
        written = self._written.get(str(body.metadata.uid))
        if not written:
            return
        for full_key in self.make_keys(key, body=body):
            last = written.pop(full_key, None)
            if last is not None and last.before(patch):
                patch.setdefault("metadata", {}).setdefault("annotations", {})[full_key] = None
        if not written:
            self.forget(body.metadata.uid)

    def forget(self, uid: str | None) -> None:
        if uid:
            self._written.pop(uid, None)

    def __len__(self) -> int:
        return len(self._written)


class MemoryDiffBaseStorage(kopf.DiffBaseStorage):
    """Kopf's last-handled state of each object (how it tells a create from an update from nothing
    new), kept in this process instead of an annotation on the object.

    An annotation costs one PATCH and one more watch event after every handled change: about a
    fifth of the API writes of a new Tenant. Our handlers are level-based, so the state need not
    outlive the process: after a restart every object is new to Kopf, and its create handler
    confirms what is in sync from bulk facts without a write (handlers/tenant.py).
    Entries go with their objects (``forget``), and so do ``progress``'s.
    """

    def __init__(self, *, ignored_prefix: str, ignored_fields: Iterable[Any] | None = None,
                 progress: PurgingProgressStorage | None = None) -> None:
        super().__init__(ignored_fields=ignored_fields)
        self._ignored_prefix = f"{ignored_prefix}/"
        self._essences: dict[str, Any] = {}
        self._progress = progress

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> Any:
        if not extra_fields:
            # Kopf's build deep-copies the whole body and then drops all but the spec, labels and
            # annotations: for every event, a copy of the status and managedFields made for nothing.
            meta = body.get("metadata") or {}
            trimmed = {k: v for k, v in body.items() if k not in ("metadata", "status")}
            trimmed["metadata"] = {k: meta[k] for k in ("labels", "annotations") if k in meta}
            body = cast(kopf.Body, trimmed)
        essence = super().build(body=body, extra_fields=extra_fields)
        # Kopf's own progress and the annotation of the storage this one replaced are not ours.
        annotations = (essence.get("metadata") or {}).get("annotations") or {}
        for key in [k for k in annotations if k.startswith(self._ignored_prefix)]:
            del annotations[key]
        self.remove_empty_stanzas(essence)
        return essence

    def fetch(self, *, body: kopf.Body) -> Any:
        essence = self._essences.get(str(body.metadata.uid))
        return copy.deepcopy(essence) if essence is not None else None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        self._essences[str(body.metadata.uid)] = compact(essence)  # a deep copy, sharing repeated strings

    def forget(self, uid: str | None) -> None:
        if uid:
            self._essences.pop(uid, None)
        if self._progress is not None:
            self._progress.forget(uid)

    def __len__(self) -> int:
        return len(self._essences)
