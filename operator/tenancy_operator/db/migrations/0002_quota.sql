-- Quota usage by tenant and resource (the runbooks' table name). The operator writes what it
-- measures itself (storage in bytes, connections); the platform's services write application
-- usage (e.g. concurrentJobs from the job runner) and the operator reads it back into Quota status.
-- Effective limits are published in tenants.quotas (0001).
CREATE TABLE tenant_quota_usage (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    resource    text NOT NULL CHECK (resource ~ '^[A-Za-z][A-Za-z0-9]{0,62}$'),
    used        numeric NOT NULL CHECK (used >= 0),
    measured_at timestamptz NOT NULL DEFAULT now(),
    source      text NOT NULL DEFAULT 'platform',
    PRIMARY KEY (tenant_id, resource)
);
COMMENT ON TABLE tenant_quota_usage IS
    'Usage per tenant and limit name (storage bytes, connections, concurrentJobs, ...). Rows with source = operator are rewritten at every measurement; other rows are read back.';
