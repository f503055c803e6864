-- Lifecycle jobs: every long or risky step for a tenant, with its attempts and outcome.
CREATE TABLE lifecycle_jobs (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    uuid NOT NULL REFERENCES tenants (id),
    kind         text NOT NULL CHECK (kind IN ('provision', 'migrate', 'suspend', 'resume', 'rotate',
                                                'archive', 'restore', 'purge', 'delete')),
    state        text NOT NULL CHECK (state IN ('pending', 'running', 'succeeded', 'failed')),
    attempt      integer NOT NULL DEFAULT 1,
    generation   bigint,
    detail       text,
    error        text,
    retry_token  text,
    note         text,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX lifecycle_jobs_tenant ON lifecycle_jobs (tenant_id, started_at DESC);

-- Archives written by deletionPolicy: Archive; purged after their retention.
CREATE TABLE tenant_archives (
    id          text PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    namespace   text NOT NULL,
    name        text NOT NULL,
    schema_name text NOT NULL,
    path        text NOT NULL,
    sha256      text NOT NULL,
    size_bytes  bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    purged_at   timestamptz
);
CREATE INDEX tenant_archives_name ON tenant_archives (namespace, name, created_at DESC);
