"""Kopf's last-handled state kept in memory: what counts as a change, and what is forgotten."""

from __future__ import annotations

from typing import Any

import kopf

from tenancy_operator.handlers.common import MemoryDiffBaseStorage, PurgingProgressStorage
from tenancy_operator.runtime_context import Tombstones


def body(**annotations: str) -> kopf.Body:
    raw: dict[str, Any] = {
        "apiVersion": "tenancy.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": "acme", "namespace": "ns", "uid": "u-1", "resourceVersion": "7",
                     "annotations": annotations},
        "spec": {"tier": "pro"},
        "status": {"phase": "Active"},
    }
    return kopf.Body(raw)  # type: ignore[arg-type]


def test_the_state_is_remembered_per_object_and_forgotten_with_it() -> None:
    storage = MemoryDiffBaseStorage(ignored_prefix="kopf.tenancy.dev")
    b = body()
    assert storage.fetch(body=b) is None  # never handled by this process: a creation for Kopf
    essence = storage.build(body=b)
    patch = kopf.Patch()
    storage.store(body=b, patch=patch, essence=essence)
    assert not patch  # nothing written to the object
    assert storage.fetch(body=b) == {"spec": {"tier": "pro"}}
    storage.forget("u-1")
    assert storage.fetch(body=b) is None and len(storage) == 0


def test_kopfs_own_annotations_are_not_changes_but_the_users_are() -> None:
    storage = MemoryDiffBaseStorage(ignored_prefix="kopf.tenancy.dev")
    plain = storage.build(body=body())
    assert storage.build(body=body(**{
        "kopf.tenancy.dev/last-handled-configuration": "{}",  # written by earlier versions
        "kopf.tenancy.dev/reconcile": '{"retries": 1}',
    })) == plain
    assert storage.build(body=body(**{"tenancy.dev/rotate-credentials": "1"})) != plain


def test_tombstones_remember_the_newest_deletions_only() -> None:
    gone = Tombstones(limit=2)
    gone.add("a")
    gone.add(None)  # an object without a uid is never remembered
    gone.add("b")
    gone.add("a")  # seen again: the newest now
    gone.add("c")
    assert "a" in gone and "c" in gone
    assert "b" not in gone
    assert len(gone) == 2


def test_the_essence_is_kopfs_own_without_copying_the_status() -> None:
    raw: dict[str, Any] = {
        "apiVersion": "tenancy.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"name": "acme", "namespace": "ns", "uid": "u-1", "resourceVersion": "7", "generation": 3,
                     "labels": {"team": "a"}, "annotations": {"tenancy.dev/rotate-credentials": "1"},
                     "finalizers": ["tenancy.dev/finalizer"], "managedFields": [{"manager": "kopf"}]},
        "spec": {"tier": "pro", "placement": {"requiredLabels": {"residency": "eu"}}},
        "status": {"phase": "Active", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    ours = MemoryDiffBaseStorage(ignored_prefix="kopf.tenancy.dev").build(body=kopf.Body(raw))  # type: ignore[arg-type]
    assert ours == kopf.AnnotationsDiffBaseStorage(prefix="kopf.tenancy.dev").build(body=kopf.Body(raw))  # type: ignore[arg-type]
    assert ours == {"metadata": {"labels": {"team": "a"}, "annotations": {"tenancy.dev/rotate-credentials": "1"}},
                    "spec": {"tier": "pro", "placement": {"requiredLabels": {"residency": "eu"}}}}
    ours["spec"]["placement"]["requiredLabels"]["residency"] = "us"
    assert raw["spec"]["placement"]["requiredLabels"]["residency"] == "eu"  # a copy, not the body's own


def test_a_retry_record_is_purged_even_from_a_body_older_than_it() -> None:
    """Kopf writes a failed handler's retry record into an annotation, then may run the handler
    again on the body it had before that patch (past the consistency timeout). When the handler
    then succeeds, the record must still be removed, not left on the object; a handler done at its
    first run must still cost no write."""
    progress = PurgingProgressStorage(prefix="kopf.tenancy.dev")
    storage = MemoryDiffBaseStorage(ignored_prefix="kopf.tenancy.dev", progress=progress)
    handler = kopf.HandlerId("reconcile")
    stale = body()

    first = kopf.Patch()  # done at the first run: Kopf stores and purges in one patch
    progress.store(key=handler, record={"success": True}, body=stale, patch=first)
    progress.purge(key=handler, body=stale, patch=first)
    assert not first and len(progress) == 0

    failed = kopf.Patch()  # a failure: the retry record, sent
    progress.store(key=handler, record={"retries": 1, "delayed": "2026-12-06T06:19:16"}, body=stale, patch=failed)
    annotation = next(iter(failed["metadata"]["annotations"]))
    assert annotation.startswith("kopf.tenancy.dev/")
    done = kopf.Patch()  # the retry succeeds on the body from before that patch
    progress.store(key=handler, record={"retries": 2, "success": True}, body=stale, patch=done)
    progress.purge(key=handler, body=stale, patch=done)
    assert done["metadata"]["annotations"] == {annotation: None}
    assert len(progress) == 0

    # On a current body (Kopf's own case) the same; and forgotten with the object.
    progress.store(key=handler, record={"retries": 1}, body=stale, patch=kopf.Patch())
    again = kopf.Patch()
    progress.purge(key=handler, body=body(**{annotation: '{"retries":1}'}), patch=again)
    assert again["metadata"]["annotations"] == {annotation: None}
    progress.store(key=handler, record={"retries": 1}, body=stale, patch=kopf.Patch())
    storage.forget("u-1")
    assert len(progress) == 0
