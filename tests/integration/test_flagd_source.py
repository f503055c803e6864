"""The namespace's flagd source (ConfigMap `tenancy-flagd-source`, key `flagd.json`) against the real
API server, both PostgreSQL targets and the operator process: every flag of the namespace in one
document that the official flagd provider reads as it is, following edits and deletions, never
two flags under one key, a foreign ConfigMap of that name left alone, too large a document not
written."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import V1ConfigMap
from kubernetes.client.exceptions import ApiException
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.contrib.provider.flagd import FlagdProvider
from openfeature.contrib.provider.flagd.config import ResolverType
from openfeature.evaluation_context import EvaluationContext

from tenancy_devenv.stack import LocalStack
from tenancy_operator.api.names import FLAGD_LABEL, FLAGD_SOURCE_LABEL, MANAGED_BY_KEY
from tenancy_operator.flags import TENANT_ATTRIBUTE, evaluate

from .harness import Cluster, OperatorProcess, eventually
from .test_featureflag import PLURAL, featureflag, patch, written

SOURCE = "tenancy-flagd-source"
CONDITION = "NamespaceSourcePublished"


@pytest.fixture
def quiet_provider() -> Iterator[None]:
    logger = logging.getLogger("openfeature")  # an error line for every percentage without a targeting key
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def source_cm(cluster: Cluster, namespace: str) -> V1ConfigMap | None:
    try:
        return cluster.core.read_namespaced_config_map(SOURCE, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def source_flags(cluster: Cluster, namespace: str) -> dict[str, Any]:
    cm = source_cm(cluster, namespace)
    assert cm is not None, "no namespace source yet"
    return json.loads(cm.data["flagd.json"])["flags"]  # type: ignore[no-any-return]


def per_flag(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(cluster.core.read_namespaced_config_map(f"{name}-flagd", namespace).data["flagd.json"])  # type: ignore[no-any-return]


def file_client(path: Path, text: str, domain: str) -> OpenFeatureClient:
    path.write_text(text)
    api.set_provider_and_wait(FlagdProvider(resolver_type=ResolverType.FILE, offline_flag_source_path=str(path)),
                              domain)
    return api.get_client(domain)


def test_every_flag_of_the_namespace_in_one_source_read_by_flagd(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str, tmp_path: Path,
    quiet_provider: None,
) -> None:
    cluster.create(PLURAL, namespace, featureflag(
        "new-dashboard", description="The redesigned dashboard.",
        rollout={"variant": "on", "percentage": 25},
        tenants=[{"tenant": "acme-corp", "variant": "on"}, {"tenant": "globex", "percentage": 50}],
        users=[{"tenant": "acme-corp", "user": "alice", "variant": "off"}],
    ))
    cluster.create(PLURAL, namespace, featureflag(
        "theme", key="ui-theme", variants={"light": {"value": "l"}, "dark": {"value": "d"}, "hc": {"value": "h"}},
        defaultVariant="light",
        rollout={"weights": [{"variant": "light", "weight": 2}, {"variant": "dark", "weight": 1}]},
        tenants=[{"tenant": "initech", "variant": "hc"}],
    ))
    for name in ("new-dashboard", "theme"):
        obj = cluster.wait_condition(PLURAL, namespace, name)
        cluster.wait_condition(PLURAL, namespace, name, CONDITION)
        assert obj["status"]["configMap"] == f"{name}-flagd"  # the per-flag source stays
    flags = eventually(lambda: (f := source_flags(cluster, namespace)) and set(f) == {"new-dashboard", "ui-theme"}
                       and f, timeout=30, what="both flags in the namespace source")

    cm = source_cm(cluster, namespace)
    assert cm is not None
    labels = cm.metadata.labels
    assert labels[MANAGED_BY_KEY] == "tenancy-operator"
    assert labels[FLAGD_SOURCE_LABEL] == "namespace"
    assert FLAGD_LABEL not in labels  # selecting the per-flag ConfigMaps does not pick it up twice
    text = cm.data["flagd.json"]
    document = json.loads(text)
    assert document["$schema"] == "https://flagd.dev/schema/v0/flags.json"
    assert text == json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n"  # deterministic
    # Each flag exactly as its own ConfigMap publishes it.
    assert flags["new-dashboard"] == per_flag(cluster, namespace, "new-dashboard")["flags"]["new-dashboard"]
    assert flags["ui-theme"] == per_flag(cluster, namespace, "theme")["flags"]["ui-theme"]
    assert flags["ui-theme"]["metadata"]["featureflag"] == "theme"

    # The official flagd provider reads the namespace document as it is, and answers as it does
    # from each per-flag document and as the operator's evaluation of the stored rows does.
    dashboard, theme = written(stack, namespace, "new-dashboard", 1), written(stack, namespace, "ui-theme", 1)
    whole = file_client(tmp_path / "namespace.json", text, "ns-source")
    single = {
        key: file_client(tmp_path / f"{name}.json", json.dumps(per_flag(cluster, namespace, name)), f"ns-{name}")
        for key, name in (("new-dashboard", "new-dashboard"), ("ui-theme", "theme"))
    }
    rng = random.Random(11)
    try:
        for _ in range(1000):
            t = rng.choice(["acme-corp", "globex", "initech", "umbrella", None])
            u = rng.choice(["alice", f"user-{rng.randint(0, 10**6)}"])
            ctx = EvaluationContext(u, {TENANT_ATTRIBUTE: t} if t else {})
            got = whole.get_boolean_details("new-dashboard", False, ctx)
            assert got.error_code is None, got.error_message
            assert got.variant == single["new-dashboard"].get_boolean_details("new-dashboard", False, ctx).variant
            assert (got.variant, got.value) == (evaluate(dashboard, t, u).variant, evaluate(dashboard, t, u).value)
            got_s = whole.get_string_details("ui-theme", "code-default", ctx)
            assert got_s.error_code is None, got_s.error_message
            assert got_s.variant == single["ui-theme"].get_string_details("ui-theme", "code-default", ctx).variant
            assert (got_s.variant, got_s.value) == (evaluate(theme, t, u).variant, evaluate(theme, t, u).value)
    finally:
        api.shutdown()

    # A change that changes nothing any user gets (the overrides reordered) writes nothing.
    version = cm.metadata.resource_version
    generation = patch(cluster, namespace, "new-dashboard", {"tenants": [
        {"tenant": "globex", "percentage": 50}, {"tenant": "acme-corp", "variant": "on"}]}, "reorder")
    eventually(lambda: cluster.get(PLURAL, namespace, "new-dashboard")["status"]["observedGeneration"] == generation,
               timeout=30, what="the reordered flag reconciled")
    cm_after = source_cm(cluster, namespace)
    assert cm_after is not None
    assert cm_after.metadata.resource_version == version


def test_edits_deletions_and_key_conflicts_follow_in_the_namespace_source(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.create(PLURAL, namespace, featureflag("alpha", rollout={"variant": "on", "percentage": 10}))
    cluster.create(PLURAL, namespace, featureflag("beta", enabled=False))
    cluster.wait_condition(PLURAL, namespace, "alpha")
    cluster.wait_condition(PLURAL, namespace, "beta")
    eventually(lambda: set(source_flags(cluster, namespace)) == {"alpha", "beta"}, timeout=30,
               what="alpha and beta in the namespace source")

    # Editing one flag updates its entry, the other is untouched.
    beta_before = source_flags(cluster, namespace)["beta"]
    patch(cluster, namespace, "alpha", {"rollout": {"percentage": 70}}, "release-manager")
    eventually(lambda: source_flags(cluster, namespace)["alpha"].get("targeting")
               == {"fractional": [["on", 70], ["off", 30]]}, timeout=30, what="alpha's edit in the source")
    assert source_flags(cluster, namespace)["beta"] == beta_before

    # A second FeatureFlag with alpha's key is refused: the source keeps the one holding the key.
    cluster.create(PLURAL, namespace, featureflag("alpha-impostor", key="alpha", enabled=False))
    cluster.wait_condition(PLURAL, namespace, "alpha-impostor", status="False", reason="Conflict")
    assert not cluster.condition(PLURAL, namespace, "alpha-impostor", CONDITION)
    assert source_flags(cluster, namespace)["alpha"]["metadata"]["featureflag"] == "alpha"

    # Deleting one removes it; its key's other FeatureFlag takes it over.
    cluster.delete(PLURAL, namespace, "alpha")
    eventually(lambda: source_flags(cluster, namespace)["alpha"]["metadata"]["featureflag"] == "alpha-impostor",
               timeout=60, what="the impostor's flag under key alpha")
    assert source_flags(cluster, namespace)["alpha"]["metadata"]["enabled"] is False
    cluster.delete(PLURAL, namespace, "beta")
    eventually(lambda: set(source_flags(cluster, namespace)) == {"alpha"}, timeout=60, what="beta removed")

    # The last one goes: so does the source.
    cluster.delete(PLURAL, namespace, "alpha-impostor")
    eventually(lambda: source_cm(cluster, namespace) is None, timeout=60, what="namespace source removed")
    assert cluster.gone(PLURAL, namespace, "alpha-impostor")


def test_a_foreign_configmap_of_that_name_is_left_alone(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    foreign = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": SOURCE, "labels": {"team": "web"}},
               "data": {"flagd.json": "{\"flags\": {}}", "owner": "web team"}}
    created = cluster.core.create_namespaced_config_map(namespace, foreign)
    cluster.create(PLURAL, namespace, featureflag("gamma"))
    cluster.wait_condition(PLURAL, namespace, "gamma")  # the flag itself is published
    cond = cluster.wait_condition(PLURAL, namespace, "gamma", CONDITION, status="False", reason="Conflict")
    assert cond
    message = cluster.condition(PLURAL, namespace, "gamma", CONDITION)["message"]
    assert SOURCE in message
    assert "not managed by tenancy-operator" in message
    eventually(lambda: cluster.has_event(namespace, "gamma", "NamespaceSourceConflict", "Warning"), timeout=30,
               what="Warning NamespaceSourceConflict")
    assert cluster.core.read_namespaced_config_map("gamma-flagd", namespace).data["flagd.json"]
    # Sweeps come and go (every 3 s), each rebuilding the namespace source after its flags: the
    # flag's own ConfigMap re-created twice by them means a whole sweep passed in between.
    for _ in range(2):
        cluster.core.delete_namespaced_config_map("gamma-flagd", namespace)
        eventually(lambda: cluster.core.read_namespaced_config_map("gamma-flagd", namespace), timeout=30,
                   what="gamma-flagd re-created by a sweep")
    cm = cluster.core.read_namespaced_config_map(SOURCE, namespace)
    assert cm.metadata.resource_version == created.metadata.resource_version
    assert cm.data == foreign["data"]

    # Its owner removes it: the next sweep publishes the namespace source, the condition follows.
    cluster.core.delete_namespaced_config_map(SOURCE, namespace)
    eventually(lambda: set(source_flags(cluster, namespace)) == {"gamma"}, timeout=30,
               what="the namespace source once the name is free")
    eventually(lambda: cluster.condition(PLURAL, namespace, "gamma", CONDITION).get("status") == "True",
               timeout=30, what="NamespaceSourcePublished=True")

    # Ours edited by hand: the sweep puts it back.
    published = source_flags(cluster, namespace)
    cluster.core.patch_namespaced_config_map(SOURCE, namespace, {"data": {"flagd.json": "{\"flags\": {}}"}})
    eventually(lambda: source_flags(cluster, namespace) == published, timeout=30, what="the source repaired")


def test_a_source_too_large_is_not_written_and_the_last_one_stays(
    stack: LocalStack, cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """Three flags of ~390 kB each (48 variants of 8000-character strings): two fit in a
    ConfigMap's 1 MiB, three do not."""
    def big(i: int) -> dict[str, Any]:
        variants = {f"v{j}": {"value": f"{i}-{j}-".ljust(8000, "x")} for j in range(48)}
        return featureflag(f"big-{i}", variants=variants, defaultVariant="v0")

    for i in (0, 1):
        cluster.create(PLURAL, namespace, big(i))
        cluster.wait_condition(PLURAL, namespace, f"big-{i}", CONDITION)
    eventually(lambda: set(source_flags(cluster, namespace)) == {"big-0", "big-1"}, timeout=30,
               what="two big flags in the source")
    cm = source_cm(cluster, namespace)
    assert cm is not None
    version = cm.metadata.resource_version

    cluster.create(PLURAL, namespace, big(2))
    cluster.wait_condition(PLURAL, namespace, "big-2")  # the flag itself is published
    cluster.wait_condition(PLURAL, namespace, "big-2", CONDITION, status="False", reason="TooLarge")
    message = cluster.condition(PLURAL, namespace, "big-2", CONDITION)["message"]
    assert "1048576" in message
    assert "last document (2 flag(s)) is kept" in message
    eventually(lambda: cluster.has_event(namespace, "big-2", "NamespaceSourceTooLarge", "Warning"), timeout=30,
               what="Warning NamespaceSourceTooLarge")
    assert per_flag(cluster, namespace, "big-2")["flags"]["big-2"]["defaultVariant"] == "v0"
    cm = source_cm(cluster, namespace)
    assert cm is not None
    assert cm.metadata.resource_version == version  # nothing truncated written
    assert set(json.loads(cm.data["flagd.json"])["flags"]) == {"big-0", "big-1"}

    # Room again: the source holds every flag, and the condition follows.
    cluster.delete(PLURAL, namespace, "big-0")
    eventually(lambda: set(source_flags(cluster, namespace)) == {"big-1", "big-2"}, timeout=60,
               what="the source written once it fits")
    eventually(lambda: cluster.condition(PLURAL, namespace, "big-2", CONDITION).get("status") == "True",
               timeout=30, what="NamespaceSourcePublished=True again")
