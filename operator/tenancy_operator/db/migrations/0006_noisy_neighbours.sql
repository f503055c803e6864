-- Containment of noisy neighbours is recorded in the lifecycle ledger: 'contain' when a declared
-- containment lowers a tenant role's limits, 'release' when they are restored.
ALTER TABLE lifecycle_jobs DROP CONSTRAINT IF EXISTS lifecycle_jobs_kind_check;
ALTER TABLE lifecycle_jobs ADD CONSTRAINT lifecycle_jobs_kind_check
    CHECK (kind IN ('provision', 'migrate', 'suspend', 'resume', 'rotate', 'archive', 'restore', 'purge',
                    'delete', 'contain', 'release'));
