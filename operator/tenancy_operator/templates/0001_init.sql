-- Default tenant schema: used when a Tenant names no schemaTemplate ConfigMap.
CREATE TABLE tenant_settings (
    key        text PRIMARY KEY,
    value      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
