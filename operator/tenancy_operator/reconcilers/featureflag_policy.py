"""What a FeatureFlag publishes, worked out without I/O: the name and body of its own flagd
ConfigMap, the stored record of its stepped rollout, the audit trail's actor, and whether a
ConfigMap is owned by it. The reconcile (featureflag.py) and the namespace's flagd source
(featureflag_source.py) read and write; nothing here does.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from tenancy_operator import GROUP, VERSION
from tenancy_operator.api.featureflag import RolloutStatus
from tenancy_operator.api.names import FLAG_LABEL, FLAGD_LABEL, GENERATION_ANNOTATION, MANAGED_BY
from tenancy_operator.flags.flagd import flagd_document
from tenancy_operator.flags.model import FlagDefinition
from tenancy_operator.k8s.managed_fields import last_change

PLURAL = "featureflags"
FLAGD_DATA_KEY = "flagd.json"
CONFIGMAP_SUFFIX = "-flagd"
MAX_NAME = 253


def configmap_name(flag_name: str) -> str:
    """`<name>-flagd`, shortened with a hash when the FeatureFlag's name is very long."""
    name = flag_name + CONFIGMAP_SUFFIX
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(flag_name.encode()).hexdigest()[:10]
    return f"{flag_name[: MAX_NAME - len(CONFIGMAP_SUFFIX) - 11].rstrip('.-')}-{digest}{CONFIGMAP_SUFFIX}"


def last_spec_change(meta: Mapping[str, Any]) -> tuple[str | None, datetime.datetime | None]:
    """The field manager (and time) of the most recent change to `spec`: the audit trail's actor."""
    return last_change(meta, ("f:spec",))


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(o.get("uid") == uid for o in (obj.get("metadata") or {}).get("ownerReferences") or [])


def stored_rollout(body: Mapping[str, Any]) -> RolloutStatus | None:
    """status.rollout of a stepped rollout (None: none, or unreadable: it starts again at its first step)."""
    raw = (body.get("status") or {}).get("rollout")
    try:
        record = RolloutStatus.model_validate(raw) if isinstance(raw, Mapping) else None
    except ValidationError:
        return None
    return record if record is not None and record.phase is not None else None


def configmap_body(body: Mapping[str, Any], flag: FlagDefinition) -> dict[str, Any]:
    """The flag's own ConfigMap as it should be: the flag's flagd document, owned by the FeatureFlag."""
    meta = body["metadata"]
    doc = flagd_document([flag], {"namespace": meta["namespace"], "featureflag": meta["name"]})
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": {**MANAGED_BY, FLAG_LABEL: meta["name"], FLAGD_LABEL: "true"},
            "annotations": {GENERATION_ANNOTATION: str(meta.get("generation") or 0)},
            "ownerReferences": [{
                "apiVersion": body.get("apiVersion", f"{GROUP}/{VERSION}"), "kind": "FeatureFlag",
                "name": meta["name"], "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True,
            }],
        },
        "data": {FLAGD_DATA_KEY: json.dumps(doc, indent=2, sort_keys=True) + "\n"},
    }
