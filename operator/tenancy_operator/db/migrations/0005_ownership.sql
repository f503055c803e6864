-- The credentials Secret the operator created for a tenant, by its Kubernetes uid: a Secret of the
-- same name created by anyone else (another uid) is never adopted.
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS secret_uid text;
-- A random claim the operator writes here before it creates the Secret, and into the Secret's
-- annotations: an operator stopped between creating the Secret and recording its uid knows it again.
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS secret_claim text;
