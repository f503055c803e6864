"""The Kubernetes API as a workstation tool sees it, configured the way kubectl is.

For the `kubectl tenancy` plugin (tenancy_operator/plugin): KUBECONFIG (several files joined
with `:`, merged as kubectl merges them) or ~/.kube/config, `--kubeconfig`, `--context`, and the
context's namespace as the default. kubernetes_asyncio reads the kubeconfig (exec credential
plugins, auth providers, merged files: what a workstation's kubeconfig may hold); the requests go
through the operator's gateway. Every failure of the API or of the connection to it comes out as
``KubeError``. kubernetes_asyncio is the plugin's own dependency (the `kubectl` extra): the
operator does not install it (k8s/http.py says why).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import kopf
from kubernetes_asyncio import client
from kubernetes_asyncio.config.config_exception import ConfigException
from kubernetes_asyncio.config.kube_config import ENV_KUBECONFIG_PATH_SEPARATOR, KubeConfigLoader, KubeConfigMerger

from tenancy_operator.k8s.client import ApiError, Kube
from tenancy_operator.k8s.http import Transport

T = TypeVar("T")
FIELD_MANAGER = "kubectl-tenancy"


class KubeError(Exception):
    """The API server refused or could not be reached; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class KubeTarget:
    """What a kubeconfig selects: the files read, the context and its default namespace."""

    paths: tuple[str, ...]
    context: str
    namespace: str


def kubeconfig_paths(explicit: str | None = None, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The kubeconfig files kubectl would read: --kubeconfig; else $KUBECONFIG's existing entries;
    else ~/.kube/config."""
    env = os.environ if environ is None else environ
    if explicit:
        return (os.path.expanduser(explicit),)
    listed = [os.path.expanduser(p) for p in env.get("KUBECONFIG", "").split(ENV_KUBECONFIG_PATH_SEPARATOR) if p]
    return tuple(listed) or (str(Path.home() / ".kube" / "config"),)


def _loader(paths: tuple[str, ...], context: str | None) -> KubeConfigLoader:
    """Files that do not exist are skipped, as kubectl skips them; none at all is an error."""
    if not any(os.path.exists(p) for p in paths):
        raise KubeError(0, f"no kubeconfig found (looked at: {', '.join(paths)}); set KUBECONFIG or pass --kubeconfig")
    merged = KubeConfigMerger(ENV_KUBECONFIG_PATH_SEPARATOR.join(paths))
    try:
        loader = KubeConfigLoader(config_dict=merged.config, config_base_path=None, active_context=context)
    except (ConfigException, KeyError, TypeError) as exc:
        raise KubeError(0, f"kubeconfig: {exc}") from exc
    if loader.current_context is None:
        raise KubeError(0, f"kubeconfig: no context {context!r}" if context else "kubeconfig: no current context")
    return loader


def resolve(kubeconfig: str | None = None, context: str | None = None) -> KubeTarget:
    """The files, context and default namespace, without connecting."""
    paths = kubeconfig_paths(kubeconfig)
    current = _loader(paths, context).current_context or {}
    namespace = (current.get("context") or {}).get("namespace") or "default"
    return KubeTarget(paths, str(current.get("name") or ""), str(namespace))


class PluginKube(Kube):
    """The operator's Kube with what a command-line tool needs besides: one object, a merge patch
    of it, Events, all through ``call``: every failure a KubeError, never an ApiError."""

    field_manager = FIELD_MANAGER
    """Who the API server records as the author of our patches (managedFields); the operator's
    job ledger shows it as the job's requestedBy."""

    @classmethod
    async def from_kubeconfig(cls, kubeconfig: str | None = None, context: str | None = None, *,
                              field_manager: str = FIELD_MANAGER) -> PluginKube:
        paths = kubeconfig_paths(kubeconfig)
        loader = _loader(paths, context)
        configuration = client.Configuration()
        try:
            await loader.load_and_set(configuration)
        except (ConfigException, KeyError, TypeError, ValueError) as exc:
            raise KubeError(0, f"kubeconfig: {exc}") from exc
        info, credentials = _credentials(configuration)
        kube = cls(Transport(info, credentials, server_hostname=getattr(configuration, "tls_server_name", None)))
        kube.field_manager = field_manager
        return kube

    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run one request; ApiError and connection failures become KubeError."""
        try:
            return await make()
        except ApiError as exc:
            raise KubeError(exc.status, f"{exc.status} {exc.message}") from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise KubeError(0, f"cannot reach the API server: {exc}") from exc

    async def read_object(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """One of our objects; None when there is none of that name."""
        return await self.call(lambda: self.get_object(plural, namespace, name))

    async def merge_patch(self, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch of one of our objects (spec, metadata); the object after it."""
        return await self.call(lambda: self.patch_object(plural, namespace, name, patch,
                                                         field_manager=self.field_manager))

    async def list_all(self, plural: str, namespace: str | None) -> list[dict[str, Any]]:
        """Our objects of one kind in ``namespace``; None: in every namespace."""
        return await self.call(lambda: self.list_objects(plural, namespace))

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.call(lambda: self.get_secret(namespace, name))

    async def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.call(lambda: self.get_configmap(namespace, name))

    async def read_events(self, namespace: str | None, field_selector: str = "") -> list[dict[str, Any]]:
        """Events (core/v1) in ``namespace`` (None: every namespace) matching ``field_selector``."""
        return await self.call(lambda: self.list_events(namespace, field_selector))


def _credentials(
        configuration: client.Configuration) -> tuple[kopf.ConnectionInfo, Callable[[], kopf.ConnectionInfo]]:
    """The kubeconfig's endpoint and credentials as loaded by kubernetes_asyncio, for a Transport.
    A command runs for seconds: a token is taken once (a 401 is final)."""
    scheme, _, token = str(configuration.api_key.get("BearerToken") or "").partition(" ")
    info = kopf.ConnectionInfo(
        server=str(configuration.host or ""), ca_path=configuration.ssl_ca_cert, insecure=not configuration.verify_ssl,
        certificate_path=configuration.cert_file, private_key_path=configuration.key_file,
        scheme=scheme or None, token=token or None, proxy_url=configuration.proxy,
    )
    return info, lambda: info
