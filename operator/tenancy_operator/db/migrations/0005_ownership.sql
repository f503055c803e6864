-- The credentials Secret the operator created for a tenant, by its Kubernetes uid: a Secret of the
-- same name created by anyone else (another uid) is never adopted.
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS secret_uid text;
