"""Operator configuration, read from environment variables (prefix ``TENANCY_``).

Database targets are named so that a Tenant can pick one with ``spec.database``. They come
from ``TENANCY_DATABASE_TARGETS`` (JSON: name -> DSN) and/or a directory
(``TENANCY_DATABASE_TARGETS_DIR``, e.g. a mounted Secret: one file per target, the file name
is the target, its content the DSN), so DSNs with passwords never need to be on a command line.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings, SettingsConfigDict

from tenancy_operator.api.quota import tier_defaults_from_json

PG_DURATION = r"^[0-9]{1,9}(us|ms|s|min|h|d)?$"
TARGET_NAME = re.compile(r"^[a-z]([a-z0-9_-]{0,61}[a-z0-9])?$")


S3_URL = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>[A-Za-z0-9._/-]*))?$")


class StoreConfig(BaseModel):
    """An S3-compatible archive store (AWS S3, MinIO, Ceph, GCS's S3 interface): where Archive dumps go.

    Credentials come from ``credentialsDir`` (a mounted Secret: files ``accessKeyId`` and
    ``secretAccessKey``, optionally ``sessionToken``), read again at every use so a rotated Secret
    takes effect without a restart; without it, from the environment (AWS_ACCESS_KEY_ID...) or the
    pod's web identity (IRSA)."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)

    url: str = Field(pattern=S3_URL.pattern, description="s3://bucket or s3://bucket/prefix")
    endpoint: str = Field(default="", pattern=r"^(https?://[A-Za-z0-9.:\[\]-]+/?)?$")
    """e.g. http://minio.storage:9000; empty: AWS S3 of ``region``."""
    region: str = Field(default="us-east-1", pattern=r"^[a-z0-9-]{1,32}$")
    credentials_dir: Path | None = None
    server_side_encryption: Literal["", "AES256", "aws:kms"] = ""
    kms_key_id: str = Field(default="", max_length=2048)
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    """Connect and read timeout of each request to the store."""

    @property
    def bucket(self) -> str:
        match = S3_URL.match(self.url)
        assert match is not None  # the field's pattern
        return match["bucket"]

    @property
    def prefix(self) -> str:
        """The key prefix, empty or ending in ``/``."""
        match = S3_URL.match(self.url)
        assert match is not None
        prefix = (match["prefix"] or "").strip("/")
        return f"{prefix}/" if prefix else ""


def store_config(text: str, what: str) -> StoreConfig:
    """A store from JSON (an object) or a bare ``s3://`` URL."""
    value: object = text if text.startswith("s3://") else None
    if value is None:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what} is neither an s3:// URL nor valid JSON: {exc.msg}") from None
    try:
        return StoreConfig.model_validate({"url": value} if isinstance(value, str) else value)
    except ValidationError as exc:
        raise ValueError(f"{what}: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None


def json_object(text: str, setting: str) -> dict[str, Any]:
    """A setting that holds a JSON object; ValueError naming the setting otherwise."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{setting} is not valid JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{setting} must be a JSON object")
    return raw


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TENANCY_", extra="ignore")

    database_targets: str = Field(
        default="{}", description='JSON object of target name to DSN, e.g. {"default": "postgresql://..."}'
    )
    database_targets_dir: Path | None = Field(
        default=None, description="Directory with one file per target (name = target, content = DSN)."
    )
    database_target_labels: str = Field(
        default="", description='JSON target -> labels, e.g. {"eu-1": {"residency": "eu", "tier": "ssd"}}'
    )
    namespaces: str = Field(default="", description="Comma-separated namespaces to watch; empty: all.")
    control_schema: str = Field(default="tenancy", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    metrics_port: int = Field(default=8080, ge=0, le=65535)
    health_port: int = Field(default=8081, ge=0, le=65535)
    bind_address: str = "0.0.0.0"  # noqa: S104 - a pod must be reachable by Prometheus and kubelet
    log_level: str = "INFO"
    log_format: str = Field(default="json", pattern="^(json|console)$")
    # Kopf's per-object workers (one per object with events to handle) mostly wait: with few of
    # them a burst of new objects queues behind busy ones, and every watch handler with them (the
    # quota service then reads unseen Tenants with a GET each). The work is bounded by
    # reconcile_concurrency, the pool and migration_concurrency instead.
    worker_limit: int = Field(default=2048, ge=1, le=100_000)
    reconcile_concurrency: int = Field(
        default=64, ge=1, le=4096, description="Tenant reconciles and deletions at once, process-wide."
    )
    kube_max_connections: int = Field(
        default=32, ge=2, le=1000,
        description="Connections to the API server the operator's own client keeps at most (Kopf's watches and "
                    "patches have their own). Each holds asyncio's 256 KiB TLS read buffer and OpenSSL's own, "
                    "and under the periodic passes' light traffic every connection once opened stays open.",
    )
    consistency_timeout_seconds: float = Field(default=0.5, ge=0)
    sweep_interval_seconds: float = Field(default=300.0, gt=0)
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=10, ge=1)
    db_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    migration_lock_timeout: str = Field(default="5s", pattern=PG_DURATION)
    migration_statement_timeout: str = Field(default="60s", pattern=PG_DURATION)
    # Server-side timeouts are advice to a tenant (SET LOCAL statement_timeout = 0 lifts them);
    # this client-side deadline is not: past it the migration's session is ended.
    migration_deadline_seconds: float = Field(default=600.0, gt=0, le=86_400)
    # pg_dump / pg_restore of one tenant: killed past this deadline.
    archive_deadline_seconds: float = Field(default=3600.0, gt=0, le=7 * 86_400)
    # Every operator session: no statement of ours waits on a tenant's lock, or runs, for longer.
    db_lock_timeout: str = Field(default="10s", pattern=PG_DURATION)
    db_statement_timeout: str = Field(default="120s", pattern=PG_DURATION)
    # Set on every tenant role: an idle transaction cannot hold its locks for longer.
    tenant_idle_in_transaction_timeout: str = Field(default="5min", pattern=PG_DURATION)
    job_max_attempts: int = Field(default=3, ge=1, description="Failed attempts before a job stalls.")
    archive_dir: Path = Field(default=Path("/var/lib/tenancy/archive"),
                              description="Where Archive dumps go without an archive store; scratch space with one.")
    # An S3-compatible store for archives (config.StoreConfig as JSON, or a bare s3:// URL), for
    # every target; archive_stores overrides it per target (JSON: target -> store). Neither: the
    # local directory archive_dir.
    archive_store: str = ""
    archive_stores: str = ""
    # How often the store's archive descriptions are compared with the catalog (rows put back after
    # a reinstall); the comparison lists the store and reads only the descriptions the catalog lacks.
    archive_catalog_check_seconds: float = Field(default=600.0, gt=0, le=86_400)
    # pg_dump refuses a server of a newer major and pg_restore 17+ fails on 15 and 16: archive.py
    # runs each server's own major's tools (find_tool). They find their libraries themselves.
    pg_bin_dir: str | None = Field(
        default=None,
        description="Directories (separated by ':') searched first for pg_dump and pg_restore, then "
        "/usr/lib/postgresql/<major>/bin and PATH; each server gets the tools of its own major if found, "
        "else the nearest newer.",
    )
    # Shared fairly: one namespace holds at most all but a quarter of them (at least one is kept
    # for the others), so a namespace whose migrations hang cannot stop the rest of the fleet.
    migration_concurrency: int = Field(default=5, ge=1, le=64, description="Tenants migrated at once.")
    # PBKDF2 rounds of the SCRAM verifiers of tenant passwords. Key stretching protects guessable
    # human passwords; ours are 192 random bits, which no number of guesses reaches, while every
    # login (the operator's migrations, the tenant's applications) pays the rounds on its CPU, eight
    # times as many at PostgreSQL's default of 4096 (docs/reliability.md).
    scram_iterations: int = Field(default=512, ge=1, le=10_000_000)
    # Host and port written into tenant Secrets; default: those of the target's DSN.
    secret_host_override: str | None = None
    secret_sslrootcert: str | None = None
    """Path of the target's root certificate as the application sees it (in ``uri``/``jdbcUrl``);
    default: the path in the target's DSN. The certificate itself is the Secret's key ``ca.crt``."""
    # Quotas: JSON tier -> limits, merged over the built-in defaults (api/quota.py TIER_DEFAULTS).
    tier_defaults: str = Field(default="", description='e.g. {"free": {"storage": "2Gi", "connections": 5}}')
    quota_interval_seconds: float = Field(default=60.0, gt=0, description="Usage measurement period.")
    # Per-tenant tenant_quota_used/limit series; off for very large fleets (aggregates stay).
    quota_per_tenant_metrics: bool = True
    # Stepped FeatureFlag rollouts: how often each running one is looked at (its gate read, its
    # next step taken when due), and the Prometheus their gates query (empty: gates cannot be read,
    # so rollouts with a gate hold their step and say so).
    rollout_check_seconds: float = Field(default=30.0, gt=0, le=3600)
    prometheus_url: str = Field(default="", pattern=r"^(https?://\S+)?$")
    prometheus_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # Active/standby replicas: the name of the Kopf peering object (ClusterKopfPeering when watching
    # all namespaces, a KopfPeering in each watched namespace). Empty: standalone, one replica only.
    peering_name: str = Field(default="", pattern=r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?)?$")
    # Kopf pauses a replica that sees a peer of higher *or equal* priority, so each replica needs
    # its own: unset picks a random one at start-up.
    peering_priority: int | None = Field(default=None, ge=0)
    # Sharded replicas (sharding.py): every replica reconciles the slices of the fleet it holds
    # through Leases in shard_namespace; needs an API server with ShardedListAndWatch (>= 1.36).
    sharding: bool = False
    shard_slices: int = Field(default=16, ge=1, le=1024,
                              description="Slices of the uid hash space; at least the replicas, or 1: active/standby.")
    shard_lease_seconds: int = Field(default=15, ge=3, le=300)
    shard_namespace: str = Field(default="", pattern=r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?$",
                                 description="Where the Leases live; empty: $POD_NAMESPACE, else 'default'.")
    shard_group: str = Field(default="tenancy-operator", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
                             description="Lease name prefix: replicas sharing a fleet share it.")

    @model_validator(mode="after")
    def _one_way_of_running_replicas(self) -> Settings:
        if self.sharding and self.peering_name:
            raise ValueError("TENANCY_SHARDING and TENANCY_PEERING_NAME exclude each other: sharded replicas "
                             "share the fleet, peered ones stand by")
        return self

    @field_validator("log_level")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()

    @field_validator("tier_defaults")
    @classmethod
    def _tier_defaults_valid(cls, v: str) -> str:
        tier_defaults_from_json(v)  # fail at start-up, not at the first quota evaluation
        return v

    @field_validator("database_target_labels", "archive_store", "archive_stores")
    @classmethod
    def _parsed_at_start_up(cls, v: str, info: ValidationInfo) -> str:
        """Fail at start-up, naming the setting, not at the first placement or archive."""
        if v and info.field_name is not None:
            fields: dict[str, Any] = {info.field_name: v}
            probe = Settings.model_construct(**fields)
            _ = probe.target_labels if info.field_name == "database_target_labels" else probe.stores
        return v

    @cached_property
    def tier_limits(self) -> dict[str, dict[str, str]]:
        """Default limits by tier: the built-in table with TENANCY_TIER_DEFAULTS merged over it."""
        return tier_defaults_from_json(self.tier_defaults)

    @cached_property
    def targets(self) -> dict[str, str]:
        """All configured database targets, name -> DSN; validated names."""
        found: dict[str, str] = {}
        raw = json_object(self.database_targets or "{}", "TENANCY_DATABASE_TARGETS")
        if not all(isinstance(v, str) for v in raw.values()):
            raise ValueError("TENANCY_DATABASE_TARGETS must be a JSON object of name -> DSN string")
        found.update(raw)
        if self.database_targets_dir is not None and self.database_targets_dir.is_dir():
            for f in sorted(self.database_targets_dir.iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    found[f.name] = f.read_text().strip()
        for name in found:
            if not TARGET_NAME.match(name):
                raise ValueError(f"database target name {name!r} is not a valid target name")
        return found

    @cached_property
    def target_labels(self) -> dict[str, dict[str, str]]:
        """Labels of each database target (placement: a Tenant may require some); unlisted: none."""
        if not self.database_target_labels:
            return {}
        raw = json_object(self.database_target_labels, "TENANCY_DATABASE_TARGET_LABELS")
        if not all(
            isinstance(labels, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
            for labels in raw.values()
        ):
            raise ValueError("TENANCY_DATABASE_TARGET_LABELS must be a JSON object of target -> {label: value}")
        return {str(t): dict(labels) for t, labels in raw.items()}

    @cached_property
    def stores(self) -> dict[str, StoreConfig]:
        """Archive stores by target name; ``"*"``: the one for targets not named."""
        found: dict[str, StoreConfig] = {}
        if self.archive_store:
            found["*"] = store_config(self.archive_store, "TENANCY_ARCHIVE_STORE")
        if self.archive_stores:
            for target, value in json_object(self.archive_stores, "TENANCY_ARCHIVE_STORES").items():
                text = value if isinstance(value, str) else json.dumps(value)
                found[target] = store_config(text, f"TENANCY_ARCHIVE_STORES[{target!r}]")
        return found

    def store_for(self, target: str) -> StoreConfig | None:
        """The archive store of ``target``'s archives; None: the local directory."""
        return self.stores.get(target) or self.stores.get("*")

    @property
    def namespace_list(self) -> list[str]:
        return [n.strip() for n in self.namespaces.split(",") if n.strip()]
