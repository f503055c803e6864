"""What the operator's log configuration lets through: Kopf's per-object success lines only at DEBUG,
its bodies formatted whole only then, and its warnings on the work a run's end leaves counted in one line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import kopf
import pytest

from tenancy_operator.observability.kopf_logs import brief_kopf_bodies, run_end_summary
from tenancy_operator.observability.logging import configure_logging


@pytest.fixture
def restored() -> Iterator[None]:
    root, objects = logging.getLogger(), logging.getLogger("kopf.objects")
    handlers, level, objects_level = root.handlers[:], root.level, objects.level
    yield
    root.handlers[:], root.level = handlers, level
    objects.setLevel(objects_level)


REF = {"k8s_ref": {"kind": "Tenant", "namespace": "shop", "name": "acme"}}
"""What Kopf's per-object logger adds to each record."""


def test_at_info_kopf_logs_failures_of_an_object_but_not_its_successes(
        restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    objects = logging.getLogger("kopf.objects")
    objects.info("Creation is processed: 1 succeeded; 0 failed.", extra=REF)
    objects.error("Handler 'reconcile' failed temporarily: database down", extra=REF)
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["event"] == "Handler 'reconcile' failed temporarily: database down"
    assert (record["level"], record["namespace"], record["name"]) == ("error", "shop", "acme")


def test_at_debug_kopf_logs_everything(restored: None) -> None:
    configure_logging("DEBUG")
    assert logging.getLogger("kopf.objects").isEnabledFor(logging.DEBUG)


BODY = {"apiVersion": "tenancy.dev/v1alpha1", "kind": "Tenant",
        "metadata": {"namespace": "shop", "name": "acme"}, "spec": {"tier": "starter", "displayName": "ACME"}}


def test_at_info_a_kopf_body_is_not_formatted_whole(restored: None) -> None:
    # Kopf formats the body into a debug line for every change it handles, logged or not.
    brief_kopf_bodies()  # as the operator does at its start (runtime.run_operator)
    configure_logging("INFO")
    assert repr(kopf.Body(BODY)) == "<Body shop/acme>"


def test_at_debug_kopf_logs_whole_bodies(restored: None) -> None:
    brief_kopf_bodies()
    configure_logging("DEBUG")
    assert repr(kopf.Body(BODY)) == repr(BODY)


CANCELLED = "Handler 'reconcile' is cancelled. Will escalate."
"""Kopf's warning for each handler in progress when a run ends (its watch stopping)."""
UNPROCESSED = ("Unprocessed streams left for [(tenants.v1alpha1.tenancy.dev, 'a1'), "
               "(tenants.v1alpha1.tenancy.dev, 'b2'), (quotas.v1alpha1.tenancy.dev, 'c3')].")
"""Kopf's warning, one line naming every object, on the objects whose queued events a run leaves."""


def test_the_work_a_run_leaves_at_its_end_is_counted_in_one_line(
        restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    objects = logging.getLogger("kopf.objects")
    with run_end_summary():
        for name in ("acme", "globex"):
            objects.warning(CANCELLED, extra={"k8s_ref": {"kind": "Tenant", "namespace": "shop", "name": name}})
        objects.warning("Handler 'reconcile' failed temporarily: database down", extra=REF)
        logging.getLogger("kopf._core.reactor.queueing").warning(UNPROCESSED)
    failed, ended = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert failed["event"] == "Handler 'reconcile' failed temporarily: database down"
    assert ended["level"] == "info"
    assert ended["event"].startswith("the run ended with work in progress")
    assert ended["cancelled"] == {"Tenant": 2}
    assert ended["unprocessed"] == {"tenants.v1alpha1.tenancy.dev": 2, "quotas.v1alpha1.tenancy.dev": 1}
    objects.warning(CANCELLED, extra=REF)  # outside a run's block: as Kopf logs it
    assert json.loads(capsys.readouterr().out)["level"] == "warning"


def test_at_debug_kopfs_lines_on_a_run_end_are_logged_at_debug(
        restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("DEBUG")
    with run_end_summary():
        logging.getLogger("kopf.objects").warning(CANCELLED, extra=REF)
    cancelled, ended = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (cancelled["event"], cancelled["level"], cancelled["name"]) == (CANCELLED, "debug", "acme")
    assert (ended["cancelled"], ended["unprocessed"]) == ({"Tenant": 1}, {})
