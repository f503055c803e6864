-- Every intervention audited: who asked for a job (the field manager that last set the field
-- behind it, from managedFields, or "tenancy-operator" for the operator's own schedule and
-- repairs) and when they set it.
ALTER TABLE lifecycle_jobs ADD COLUMN IF NOT EXISTS requested_by text;
ALTER TABLE lifecycle_jobs ADD COLUMN IF NOT EXISTS requested_at timestamptz;
