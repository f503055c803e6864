-- Archives in an object store, each shown as a TenantArchive object. `path` holds the archive's
-- location (s3://bucket/key or a local path). object_uid: the TenantArchive the operator created
-- for it (NULL until created); token: the value of that object's tenancy.dev/archive-token
-- annotation, so an object is recognised as the operator's after a reinstall; protected mirrors
-- the object's spec.protected (no purge, by deletion or retention, while true).
ALTER TABLE tenant_archives ADD COLUMN IF NOT EXISTS target text;
ALTER TABLE tenant_archives ADD COLUMN IF NOT EXISTS tenant_uid text;
ALTER TABLE tenant_archives ADD COLUMN IF NOT EXISTS object_uid text;
ALTER TABLE tenant_archives ADD COLUMN IF NOT EXISTS token text;
ALTER TABLE tenant_archives ADD COLUMN IF NOT EXISTS protected boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS tenant_archives_unlisted ON tenant_archives (created_at)
    WHERE object_uid IS NULL AND purged_at IS NULL;
