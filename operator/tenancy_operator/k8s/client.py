"""The Kubernetes gateway: one kubernetes_asyncio client for the process, and every read and write
the operator makes outside Kopf's own patches. Nothing outside ``k8s/`` imports kubernetes_asyncio
(checked by `make lint`); callers catch ``ApiError``.

Core objects (Secrets, ConfigMaps, Events) are sent and read as plain JSON (`raw`): the client's
generated model classes cost more CPU to build and convert back than the requests themselves,
a cost paid per request and so per tenant, and a write's response body is never needed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.client.rest import RESTResponse

from tenancy_operator import GROUP, VERSION
from tenancy_operator.k8s import safejson

MERGE_PATCH = "application/merge-patch+json"
TABLE = "application/json;as=Table;g=meta.k8s.io;v=v1"
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
ApiError = ApiException
"""A non-2xx answer of the API server (``.status`` holds the HTTP code)."""


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


THROTTLED_ATTEMPTS = 5
"""How many times one request is sent while the API server answers 429."""
RETRY_AFTER_CAP = 5.0
"""The longest wait (seconds) between two sends, whatever Retry-After asks."""


def retry_after(status: int, headers: Mapping[str, str]) -> float | None:
    """Seconds to wait before sending the same request again; None: the answer is final.

    The API server answers 429 with Retry-After when it did not process the request: API Priority
    and Fairness rejected it, or a resource's storage is (re)initialising after its CRD changed.
    Sending it again is then safe for any verb, and is what client-go does; anything else is final.
    """
    if status != 429:
        return None
    try:
        seconds = float(headers.get("Retry-After", "1"))
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


async def raw(call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> bytes:
    """Call a generated API method without building model objects: the response body as bytes.
    A 429 is sent again after its Retry-After (at most THROTTLED_ATTEMPTS sends). Raises
    ApiException for a non-2xx answer, like the method itself would."""
    for attempt in range(1, THROTTLED_ATTEMPTS + 1):
        response = await call(*args, _preload_content=False, **kwargs)
        try:
            data: bytes = await response.read()
        finally:
            response.release()
        if 200 <= response.status <= 299:
            return data
        wait = retry_after(response.status, response.headers)
        if wait is None or attempt == THROTTLED_ATTEMPTS:
            raise ApiException(http_resp=RESTResponse(response, data))  # type: ignore[arg-type]
        await asyncio.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


async def _read_or_none(call: Callable[..., Awaitable[Any]], *args: Any) -> dict[str, Any] | None:
    """A read; None when the object does not exist. Decoded with safejson (see list_objects)."""
    try:
        return safejson.loads(await raw(call, *args))  # type: ignore[no-any-return]
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


class Kube:
    def __init__(self, api: client.ApiClient, namespaces: Sequence[str] = ()) -> None:
        self.api = api
        # The watched namespaces (TENANCY_NAMESPACES); empty: all. With a list, the lists below
        # ask each namespace, never the whole cluster: the chart's namespaced mode grants nothing
        # cluster-wide (helm/tenancy-operator/templates/rbac.yaml).
        self.namespaces = tuple(namespaces)
        # The generated stubs want model classes; the client accepts plain dicts, which we use.
        self.core: Any = client.CoreV1Api(api)
        self.custom: Any = client.CustomObjectsApi(api)
        self.coordination: Any = client.CoordinationV1Api(api)

    @classmethod
    async def connect(cls, namespaces: Sequence[str] = (), *, max_connections: int = 32) -> Kube:
        """``max_connections``: the pool's bound. aiohttp reuses the longest-idle connection first,
        so periodic light traffic keeps every pooled connection alive: without a small bound a
        burst's hundred connections (asyncio's 256 KiB TLS read buffer each) would stay for good."""
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        else:
            await config.load_kube_config()
        configuration = client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = max_connections
        api = client.ApiClient(configuration)
        # kubernetes_asyncio's session trusts the environment, so aiohttp looks up ~/.netrc and the
        # proxy variables in a thread for every request: two thread hops and a file read each, for
        # settings that never change. Kopf's own client does not; neither do we.
        api.rest_client.pool_manager._trust_env = False
        return cls(api, namespaces)

    async def version(self) -> None:
        await client.VersionApi(self.api).get_code()

    async def close(self) -> None:
        await self.api.close()

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await _read_or_none(self.core.read_namespaced_secret, name, namespace)

    async def create_secret(self, namespace: str, body: dict[str, Any]) -> str:
        """Returns the new Secret's uid."""
        created = safejson.loads(await raw(self.core.create_namespaced_secret, namespace, body))
        return str(created["metadata"]["uid"])

    async def replace_secret(self, namespace: str, name: str, body: dict[str, Any]) -> str:
        """Returns the Secret's uid (a replace never changes it)."""
        replaced = safejson.loads(await raw(self.core.replace_namespaced_secret, name, namespace, body))
        return str(replaced["metadata"]["uid"])

    async def delete_secret(self, namespace: str, name: str, uid: str | None = None) -> None:
        """Delete a Secret; with ``uid``, only that very object (not one re-created meanwhile)."""
        options = {"preconditions": {"uid": uid}} if uid else None
        try:
            await self.core.delete_namespaced_secret(name, namespace, body=options)
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone, or another object of that name now
                raise

    async def list_secret_metadata(self, label_selector: str) -> list[dict[str, Any]]:
        """The Secrets matching ``label_selector`` in every watched namespace, each as
        ``{"metadata": {"namespace", "name", "annotations"}}``: asked as PartialObjectMetadata, so
        the tenants' credentials are neither sent nor decoded when only their Secrets' existence
        and annotations are wanted, and read a LIST_PAGE at a time, of which only those fields are
        kept: in one answer, every Secret's metadata (managedFields, owner references: about 5 KB
        of Python objects each) would be decoded at once at each sweep, 50 MB at 10,000 tenants."""
        items: list[dict[str, Any]] = []
        for namespace in self.namespaces or [None]:
            path = "/api/v1/secrets" if namespace is None else "/api/v1/namespaces/{namespace}/secrets"

            async def page(token: str, path: str = path, namespace: str | None = namespace) -> dict[str, Any]:
                query = [("labelSelector", label_selector), ("limit", str(LIST_PAGE))]
                data = await raw(
                    self.api.call_api, path, "GET", path_params={"namespace": namespace} if namespace else {},
                    query_params=query + ([("continue", token)] if token else []),
                    header_params={"Accept": METADATA_LIST}, auth_settings=["BearerToken"],
                    _return_http_data_only=True,
                )
                return safejson.loads(data)  # type: ignore[no-any-return]

            async for result in _paged(page):
                for item in result.get("items") or []:
                    meta = item.get("metadata") or {}
                    items.append({"metadata": {k: meta[k] for k in SECRET_METADATA if k in meta}})
        return items

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await _read_or_none(self.core.read_namespaced_config_map, name, namespace)

    async def create_configmap(self, namespace: str, body: dict[str, Any]) -> None:
        await raw(self.core.create_namespaced_config_map, namespace, body)

    async def replace_configmap(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        await raw(self.core.replace_namespaced_config_map, name, namespace, body)

    async def delete_configmap(self, namespace: str, name: str) -> None:
        await raw(self.core.delete_namespaced_config_map, name, namespace)

    async def create_event(self, namespace: str, body: dict[str, Any]) -> str:
        """Create a core/v1 Event; returns its name."""
        created = safejson.loads(await raw(self.core.create_namespaced_event, namespace, body))
        return str(created["metadata"]["name"])

    async def patch_event(self, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        """Merge-patch an Event (a repeat's count and times); False when it is gone (Events expire)."""
        try:
            await raw(self.core.patch_namespaced_event, name, namespace, patch, _content_type=MERGE_PATCH)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any], *,
                           resource_version: str | None = None, decode: bool = False) -> dict[str, Any] | None:
        """Merge-patch the status; with ``resource_version``, only if the object is still that
        version (409 otherwise). With ``decode``, returns the object as written (else None: most
        writers never read it, and decoding costs CPU per write)."""
        document: dict[str, Any] = {"status": status}
        if resource_version:
            document["metadata"] = {"resourceVersion": resource_version}
        written = await raw(self.custom.patch_namespaced_custom_object_status,
                            GROUP, VERSION, namespace, plural, name, document, _content_type=MERGE_PATCH)
        return safejson.loads(written) if decode else None

    async def set_label(self, plural: str, namespace: str, name: str, key: str, value: str | None, *,
                        uid: str) -> dict[str, Any] | None:
        """Merge-patch one label of one of our objects (None removes it), only if it is still the
        object of ``uid`` (not one re-created under its name meanwhile); the object as written,
        None when it is gone."""
        patch = {"metadata": {"uid": uid, "labels": {key: value}}}
        try:
            written = await raw(self.custom.patch_namespaced_custom_object, GROUP, VERSION, namespace, plural, name,
                                patch, _content_type=MERGE_PATCH)
        except ApiException as exc:
            if exc.status in (404, 409, 422):  # gone, or another object of that name (its uid differs)
                return None
            raise
        return safejson.loads(written)  # type: ignore[no-any-return]

    async def get_object(self, plural: str, namespace: str, name: str, *,
                         group: str = GROUP, version: str = VERSION) -> dict[str, Any] | None:
        """One of our objects (or, with ``group``/``version``, any namespaced custom object); None if absent."""
        return await _read_or_none(self.custom.get_namespaced_custom_object, group, version, namespace, plural, name)

    async def get_cluster_object(self, group: str, version: str, plural: str, name: str) -> dict[str, Any] | None:
        return await _read_or_none(self.custom.get_cluster_custom_object, group, version, plural, name)

    async def list_objects(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Our objects of one kind in ``namespace``; None: in every watched namespace."""
        return [body async for page in self.list_pages(plural, namespace) for body in page.items]

    async def list_pages(self, plural: str, namespace: str | None = None, *,
                         field_selector: str = "", label_selector: str = "") -> AsyncIterator[Page]:
        """Our objects of one kind in ``namespace`` (None: every watched namespace), a LIST_PAGE
        at a time: a reader that keeps a little of each object never holds the whole fleet's
        bodies at once (their burst of short-lived objects is what the allocators keep after a
        start). Decoded with safejson: one object nested deeper than Python's json allows must
        not fail the listing. ``field_selector``: only the objects it selects (on the kind's
        selectable fields); ``label_selector``: only those its labels select."""
        for ns in (namespace,) if namespace is not None else (self.namespaces or [None]):
            async def page(token: str, ns: str | None = ns) -> dict[str, Any]:
                return await self._list(plural, ns, LIST_PAGE, token, field_selector, label_selector)

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
                    field_selector: str = "", label_selector: str = "") -> dict[str, Any]:
        paging: dict[str, Any] = {"limit": limit, **({"_continue": token} if token else {}),
                                  **({"field_selector": field_selector} if field_selector else {}),
                                  **({"label_selector": label_selector} if label_selector else {})}
        if namespace is None:
            data = await raw(self.custom.list_cluster_custom_object, GROUP, VERSION, plural, **paging)
        else:
            data = await raw(self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, plural, **paging)
        return safejson.loads(data)  # type: ignore[no-any-return]

    async def list_names(self, plural: str, namespace: str) -> set[str]:
        """The names of our objects of one kind in ``namespace``, and nothing else of them: asked
        as the Table `kubectl get` shows, without its objects. A Tenant's full body (status,
        managedFields, the last-applied annotation) is about thirty times its row, and a LIST of
        a namespace of thousands of Tenants held the event loop for seconds to be decoded."""
        data = await raw(
            self.api.call_api, f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{plural}", "GET",
            path_params={"namespace": namespace}, query_params=[("includeObject", "None")],
            header_params={"Accept": TABLE}, auth_settings=["BearerToken"], _return_http_data_only=True,
        )
        table = safejson.loads(data)
        rows = table.get("rows") or []
        if not rows:
            return set()
        # The column of the object's name is the one of format "name" (the Table API's contract).
        column = next(i for i, c in enumerate(table.get("columnDefinitions") or []) if c.get("format") == "name")
        return {str(row["cells"][column]) for row in rows}

    # --- Leases (sharding.py: which replica holds which slice of the fleet) ---------------------

    async def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await _read_or_none(self.coordination.read_namespaced_lease, name, namespace)

    async def list_leases(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        listed = await raw(self.coordination.list_namespaced_lease, namespace, label_selector=label_selector)
        result = safejson.loads(listed)
        return list(result.get("items") or [])

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Raises ApiError 409 when a Lease of that name exists."""
        return safejson.loads(await raw(self.coordination.create_namespaced_lease, namespace, body))  # type: ignore[no-any-return]

    async def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Optimistic: ``body``'s metadata.resourceVersion must be current, else ApiError 409."""
        return safejson.loads(await raw(self.coordination.replace_namespaced_lease, name, namespace, body))  # type: ignore[no-any-return]

    async def delete_lease(self, namespace: str, name: str, uid: str) -> None:
        try:
            await raw(self.coordination.delete_namespaced_lease, name, namespace, body={"preconditions": {"uid": uid}})
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    async def shard_selector_applied(self, namespace: str, shard_selector: str) -> bool:
        """Whether the API server applies ``shardSelector`` (KEP-5866): a list answered with the
        selector echoed in ``metadata.shardInfo``. A server without the ShardedListAndWatch feature
        (gate off, or older than 1.36) ignores the parameter and answers every object, unmarked.
        Leases are asked because built-in kinds' lists echo it (custom resources' do not in 1.36)."""
        data = await raw(
            self.api.call_api, "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases", "GET",
            path_params={"namespace": namespace},
            query_params=[("shardSelector", shard_selector), ("limit", "1")],
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
            _return_http_data_only=True,
        )
        info = (safejson.loads(data).get("metadata") or {}).get("shardInfo") or {}
        return bool(info.get("selector"))

    async def create_object(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create one of our objects; returns it as created."""
        created = await raw(self.custom.create_namespaced_custom_object, GROUP, VERSION, namespace, plural, body)
        return safejson.loads(created)  # type: ignore[no-any-return]

    async def delete_object(self, plural: str, namespace: str, name: str, uid: str) -> None:
        """Delete that very object (uid precondition); no error if it is gone or another has its name."""
        try:
            await self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name,
                                                              body={"preconditions": {"uid": uid}})
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
