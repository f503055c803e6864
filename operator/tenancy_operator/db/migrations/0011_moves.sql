-- Moves between database targets: the copy a move leaves on its source is in state `moved`
-- (its logins off) until drop_after, when the sweep drops it.
ALTER TABLE tenants DROP CONSTRAINT IF EXISTS tenants_state_check;
ALTER TABLE tenants ADD CONSTRAINT tenants_state_check
    CHECK (state IN ('provisioning', 'active', 'suspended', 'deleted', 'dropped', 'archived', 'moved'));
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS drop_after timestamptz;
CREATE INDEX IF NOT EXISTS tenants_moved_due ON tenants (drop_after) WHERE state = 'moved';
-- The move job; and the archive a move in progress was made from (taken once the source's writes
-- were stopped, so a retried move reuses it rather than archiving again).
ALTER TABLE lifecycle_jobs DROP CONSTRAINT IF EXISTS lifecycle_jobs_kind_check;
ALTER TABLE lifecycle_jobs ADD CONSTRAINT lifecycle_jobs_kind_check
    CHECK (kind IN ('provision', 'migrate', 'suspend', 'resume', 'rotate', 'archive', 'restore', 'purge',
                    'delete', 'contain', 'release', 'move'));
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS move_archive text;
