"""The Kubernetes gateway: every read and write the operator makes outside Kopf's own patches, as
plain JSON over one ``Transport`` (k8s/http.py) per process. Callers catch ``ApiError``.

Objects are sent and read as JSON documents: a write's response body is never needed, and a read
is decoded with safejson.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import kopf

from tenancy_operator import GROUP, VERSION
from tenancy_operator.k8s import safejson
from tenancy_operator.k8s.http import MERGE_PATCH, ApiError, Query, Transport, login, path

TABLE = "application/json;as=Table;g=meta.k8s.io;v=v1"
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
__all__ = ["MERGE_PATCH", "ApiError", "Kube", "Page", "older_version"]


def older_version(meta: Mapping[str, Any], than: Mapping[str, Any]) -> bool:
    """``meta`` is an older version of the same object than ``than``. resourceVersions are opaque
    by contract; the API server's are etcd revisions (integers that grow), anything else is never
    considered older."""
    if meta.get("uid") != than.get("uid"):
        return False
    mine, theirs = str(meta.get("resourceVersion") or ""), str(than.get("resourceVersion") or "")
    return mine.isdigit() and theirs.isdigit() and int(mine) < int(theirs)


LIST_PAGE = 500
"""Objects per page of the operator's own LISTs (list_pages, list_secret_metadata)."""
SECRET_METADATA = ("namespace", "name", "annotations")
"""What list_secret_metadata keeps of each Secret."""


def _selectors(field_selector: str = "", label_selector: str = "",
               shard_selector: str | None = None) -> list[tuple[str, str]]:
    """A LIST's selector parameters, those given only."""
    given = (("fieldSelector", field_selector), ("labelSelector", label_selector), ("shardSelector", shard_selector))
    return [(name, value) for name, value in given if value]


async def _paged(fetch: Callable[[str], Awaitable[dict[str, Any]]]) -> AsyncIterator[dict[str, Any]]:
    """The pages of one LIST: ``fetch(continue_token)`` for each (an empty token first), until the
    API server sends no continue token."""
    token = ""
    while True:
        result = await fetch(token)
        yield result
        token = str((result.get("metadata") or {}).get("continue") or "")
        if not token:
            return


class Page(NamedTuple):
    """One page of a LIST: its objects, and the resourceVersion the whole listing is as of."""

    items: list[dict[str, Any]]
    resource_version: str


def _ours(*rest: str, namespace: str | None, group: str = GROUP, version: str = VERSION) -> str:
    """The path of a custom kind's collection or object, in ``namespace`` (None: cluster-wide)."""
    where = ("namespaces", namespace) if namespace is not None else ()
    return path("apis", group, version, *where, *rest)


def _core(*rest: str, namespace: str | None) -> str:
    """The path of a core/v1 collection or object, in ``namespace`` (None: every namespace)."""
    where = ("namespaces", namespace) if namespace is not None else ()
    return path("api", "v1", *where, *rest)


def _leases(namespace: str, *name: str) -> str:
    return path("apis", "coordination.k8s.io", "v1", "namespaces", namespace, "leases", *name)


class Kube:
    def __init__(self, http: Transport, namespaces: Sequence[str] = ()) -> None:
        self.http = http
        # The watched namespaces (TENANCY_NAMESPACES); empty: all. With a list, the lists below
        # ask each namespace, never the whole cluster: the chart's namespaced mode grants nothing
        # cluster-wide (helm/tenancy-operator/templates/rbac.yaml).
        self.namespaces = tuple(namespaces)

    @classmethod
    async def connect(cls, namespaces: Sequence[str] = (), *, max_connections: int = 32) -> Kube:
        """Logged in as Kopf logs in (``http.login``); ``max_connections``: the pool's bound."""
        http = await Transport.connect(lambda: login(settings=kopf.OperatorSettings()), max_connections=max_connections)
        return cls(http, namespaces)

    async def _json(self, method: str, url_path: str, *, query: Query = (), body: Any = None,
                    content_type: str = "application/json", accept: str = "application/json") -> dict[str, Any]:
        """The answer decoded (a JSON object: every answer of the API server is one)."""
        answer = await self.http.request(method, url_path, query=query, body=body, content_type=content_type,
                                         accept=accept)
        return cast(dict[str, Any], safejson.loads(answer))

    async def _read_or_none(self, url_path: str) -> dict[str, Any] | None:
        """A read; None when the object does not exist."""
        try:
            return await self._json("GET", url_path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def _delete(self, url_path: str, uid: str | None) -> None:
        """Delete; with ``uid``, only that very object (not one re-created meanwhile). No error when
        it is gone (404) or another object has its name now (409)."""
        try:
            await self.http.request("DELETE", url_path, body={"preconditions": {"uid": uid}} if uid else None)
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise

    async def version(self) -> None:
        await self.http.request("GET", "/version")

    async def close(self) -> None:
        await self.http.close()

    # --- core/v1: Secrets, ConfigMaps, Events ---------------------------------------------------

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read_or_none(_core("secrets", name, namespace=namespace))

    async def create_secret(self, namespace: str, body: dict[str, Any]) -> str:
        """Returns the new Secret's uid."""
        created = await self._json("POST", _core("secrets", namespace=namespace), body=body)
        return str(created["metadata"]["uid"])

    async def replace_secret(self, namespace: str, name: str, body: dict[str, Any]) -> str:
        """Returns the Secret's uid (a replace never changes it)."""
        replaced = await self._json("PUT", _core("secrets", name, namespace=namespace), body=body)
        return str(replaced["metadata"]["uid"])

    async def delete_secret(self, namespace: str, name: str, uid: str | None = None) -> None:
        """Delete a Secret; with ``uid``, only that very object (not one re-created meanwhile)."""
        await self._delete(_core("secrets", name, namespace=namespace), uid)

    async def list_secret_metadata(self, label_selector: str) -> list[dict[str, Any]]:
        """The Secrets matching ``label_selector`` in every watched namespace, each as
        ``{"metadata": {"namespace", "name", "annotations"}}``: asked as PartialObjectMetadata, so
        the tenants' credentials are neither sent nor decoded when only their Secrets' existence
        and annotations are wanted, and read a LIST_PAGE at a time, of which only those fields are
        kept: in one answer, every Secret's metadata (managedFields, owner references: about 5 KB
        of Python objects each) would be decoded at once at each sweep, 50 MB at 10,000 tenants."""
        return await self._metadata([_core("secrets", namespace=ns) for ns in self.namespaces or [None]],
                                    [("labelSelector", label_selector)], SECRET_METADATA)

    async def _metadata(self, paths: Sequence[str], query: list[tuple[str, str]],
                        fields: tuple[str, ...]) -> list[dict[str, Any]]:
        """The objects a LIST of each path answers, as PartialObjectMetadata, a LIST_PAGE at a
        time, of which only the metadata ``fields`` are kept (each ``{"metadata": {...}}``)."""
        items: list[dict[str, Any]] = []
        for where in paths:
            async def page(token: str, where: str = where) -> dict[str, Any]:
                paging = [("limit", str(LIST_PAGE)), *([("continue", token)] if token else [])]
                return await self._json("GET", where, query=query + paging, accept=METADATA_LIST)

            async for result in _paged(page):
                for item in result.get("items") or []:
                    meta = item.get("metadata") or {}
                    items.append({"metadata": {k: meta[k] for k in fields if k in meta}})
        return items

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read_or_none(_core("configmaps", name, namespace=namespace))

    async def create_configmap(self, namespace: str, body: dict[str, Any]) -> None:
        await self.http.request("POST", _core("configmaps", namespace=namespace), body=body)

    async def replace_configmap(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        await self.http.request("PUT", _core("configmaps", name, namespace=namespace), body=body)

    async def delete_configmap(self, namespace: str, name: str) -> None:
        await self.http.request("DELETE", _core("configmaps", name, namespace=namespace))

    async def create_event(self, namespace: str, body: dict[str, Any]) -> str:
        """Create a core/v1 Event; returns its name."""
        created = await self._json("POST", _core("events", namespace=namespace), body=body)
        return str(created["metadata"]["name"])

    async def patch_event(self, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        """Merge-patch an Event (a repeat's count and times); False when it is gone (Events expire)."""
        try:
            await self.http.request("PATCH", _core("events", name, namespace=namespace), body=patch,
                                    content_type=MERGE_PATCH)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def list_events(self, namespace: str | None, field_selector: str = "") -> list[dict[str, Any]]:
        """Events in ``namespace`` (None: every namespace) matching ``field_selector``."""
        query = [("fieldSelector", field_selector)] if field_selector else []
        listed = await self._json("GET", _core("events", namespace=namespace), query=query)
        return list(listed.get("items") or [])

    # --- our kinds ------------------------------------------------------------------------------

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any], *,
                           resource_version: str | None = None, decode: bool = False) -> dict[str, Any] | None:
        """Merge-patch the status; with ``resource_version``, only if the object is still that
        version (409 otherwise). With ``decode``, returns the object as written (else None: most
        writers never read it, and decoding costs CPU per write)."""
        document: dict[str, Any] = {"status": status}
        if resource_version:
            document["metadata"] = {"resourceVersion": resource_version}
        written = await self.http.request("PATCH", _ours(plural, name, "status", namespace=namespace),
                                          body=document, content_type=MERGE_PATCH)
        return safejson.loads(written) if decode else None

    async def patch_object(self, plural: str, namespace: str, name: str, patch: dict[str, Any], *,
                          field_manager: str = "") -> dict[str, Any]:
        """A JSON merge patch of one of our objects (spec, metadata); the object after it.
        ``field_manager``: who the API server records as its author (managedFields)."""
        return await self._json(
            "PATCH", _ours(plural, name, namespace=namespace), body=patch, content_type=MERGE_PATCH,
            query=[("fieldManager", field_manager)] if field_manager else ())

    async def set_label(self, plural: str, namespace: str, name: str, key: str, value: str | None, *,
                        uid: str) -> dict[str, Any] | None:
        """Merge-patch one label of one of our objects (None removes it), only if it is still the
        object of ``uid`` (not one re-created under its name meanwhile); the object as written,
        None when it is gone."""
        try:
            return await self.patch_object(plural, namespace, name, {"metadata": {"uid": uid, "labels": {key: value}}})
        except ApiError as exc:
            if exc.status in (404, 409, 422):  # gone, or another object of that name (its uid differs)
                return None
            raise

    async def get_object(self, plural: str, namespace: str, name: str, *,
                         group: str = GROUP, version: str = VERSION) -> dict[str, Any] | None:
        """One of our objects (or, with ``group``/``version``, any namespaced custom object); None if absent."""
        return await self._read_or_none(_ours(plural, name, namespace=namespace, group=group, version=version))

    async def get_cluster_object(self, group: str, version: str, plural: str, name: str) -> dict[str, Any] | None:
        return await self._read_or_none(_ours(plural, name, namespace=None, group=group, version=version))

    async def list_objects(self, plural: str, namespace: str | None = None, *,
                           shard_selector: str | None = None) -> list[dict[str, Any]]:
        """Our objects of one kind in ``namespace``; None: in every watched namespace."""
        return [body async for page in self.list_pages(plural, namespace, shard_selector=shard_selector)
                for body in page.items]

    async def list_pages(self, plural: str, namespace: str | None = None, *, field_selector: str = "",
                         label_selector: str = "", shard_selector: str | None = None) -> AsyncIterator[Page]:
        """Our objects of one kind in ``namespace`` (None: every watched namespace), a LIST_PAGE
        at a time: a reader that keeps a little of each object never holds the whole fleet's
        bodies at once (their burst of short-lived objects is what the allocators keep after a
        start). Decoded with safejson: one object nested deeper than Python's json allows must
        not fail the listing. ``field_selector``: only the objects it selects (on the kind's
        selectable fields); ``label_selector``: only those its labels select; ``shard_selector``:
        only those in its uid ranges (shards.Ownership.selector: None when unsharded)."""
        for ns in (namespace,) if namespace is not None else (self.namespaces or [None]):
            async def page(token: str, ns: str | None = ns) -> dict[str, Any]:
                return await self._list(plural, ns, LIST_PAGE, token, field_selector, label_selector, shard_selector)

            async for result in _paged(page):
                meta = result.get("metadata") or {}
                yield Page(list(result.get("items") or []), str(meta.get("resourceVersion") or ""))

    async def count(self, plural: str) -> int | None:
        """How many of our objects of one kind exist in every watched namespace, from a LIST of one
        object each (the API server counts the rest: remainingItemCount); None when it does not
        say. A shard selector would not narrow the count: it counts the whole kind."""
        total = 0
        for ns in self.namespaces or [None]:
            result = await self._list(plural, ns, 1, "")
            meta = result.get("metadata") or {}
            total += len(result.get("items") or [])
            if meta.get("continue"):
                remaining = meta.get("remainingItemCount")
                if not isinstance(remaining, int):
                    return None
                total += remaining
        return total

    async def _list(self, plural: str, namespace: str | None, limit: int, token: str,
                    field_selector: str = "", label_selector: str = "",
                    shard_selector: str | None = None) -> dict[str, Any]:
        query = [("limit", str(limit)), *([("continue", token)] if token else []),
                 *_selectors(field_selector, label_selector, shard_selector)]
        return await self._json("GET", _ours(plural, namespace=namespace), query=query)

    async def list_uids(self, plural: str, shard_selector: str) -> list[dict[str, Any]]:
        """Our objects of one kind in every watched namespace within ``shard_selector``'s uid
        ranges, each as ``{"metadata": {"namespace", "name", "uid"}}``: asked as
        PartialObjectMetadata, so their specs and statuses are neither sent nor decoded (a sharded
        replica tells other replicas' Tenants from missing ones by these)."""
        return await self._metadata([_ours(plural, namespace=ns) for ns in self.namespaces or [None]],
                                    _selectors(shard_selector=shard_selector), ("namespace", "name", "uid"))

    async def list_names(self, plural: str, namespace: str) -> set[str]:
        """The names of our objects of one kind in ``namespace``, and nothing else of them: asked
        as the Table `kubectl get` shows, without its objects. A Tenant's full body (status,
        managedFields, the last-applied annotation) is about thirty times its row, and a LIST of
        a namespace of thousands of Tenants held the event loop for seconds to be decoded."""
        table = await self._json("GET", _ours(plural, namespace=namespace), query=[("includeObject", "None")],
                                 accept=TABLE)
        rows = table.get("rows") or []
        if not rows:
            return set()
        # The column of the object's name is the one of format "name" (the Table API's contract).
        column = next(i for i, c in enumerate(table.get("columnDefinitions") or []) if c.get("format") == "name")
        return {str(row["cells"][column]) for row in rows}

    async def create_object(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create one of our objects; returns it as created."""
        return await self._json("POST", _ours(plural, namespace=namespace), body=body)

    async def delete_object(self, plural: str, namespace: str, name: str, uid: str) -> None:
        """Delete that very object (uid precondition); no error if it is gone or another has its name."""
        await self._delete(_ours(plural, name, namespace=namespace), uid)

    # --- Leases (sharding.py: which replica holds which slice of the fleet) ---------------------

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read_or_none(_leases(namespace, name))

    async def list_leases(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        listed = await self._json("GET", _leases(namespace),
                                  query=[("labelSelector", label_selector)])
        return list(listed.get("items") or [])

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Raises ApiError 409 when a Lease of that name exists."""
        return await self._json("POST", _leases(namespace), body=body)

    async def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Optimistic: ``body``'s metadata.resourceVersion must be current, else ApiError 409."""
        return await self._json("PUT", _leases(namespace, name), body=body)

    async def delete_lease(self, namespace: str, name: str, uid: str) -> None:
        await self._delete(_leases(namespace, name), uid)

    async def shard_selector_applied(self, namespace: str, shard_selector: str) -> bool:
        """Whether the API server applies ``shardSelector`` (KEP-5866): a list answered with the
        selector echoed in ``metadata.shardInfo``. A server without the ShardedListAndWatch feature
        (gate off, or older than 1.36) ignores the parameter and answers every object, unmarked.
        Leases are asked because built-in kinds' lists echo it (custom resources' do not in 1.36)."""
        listed = await self._json("GET", _leases(namespace),
                                  query=[("shardSelector", shard_selector), ("limit", "1")])
        info = (listed.get("metadata") or {}).get("shardInfo") or {}
        return bool(info.get("selector"))
