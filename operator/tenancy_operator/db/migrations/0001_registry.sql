-- The tenant registry: one row per tenant ever provisioned on this target.
-- Rows of tenants whose data still exists hold their schema name; dropped ones free it.
CREATE TABLE tenants (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    namespace     text NOT NULL,
    name          text NOT NULL,
    k8s_uid       text,
    schema_name   text NOT NULL,
    role_name     text NOT NULL,
    display_name  text,
    tier          text NOT NULL,
    state         text NOT NULL CHECK (state IN ('provisioning', 'active', 'suspended', 'deleted', 'dropped', 'archived')),
    quotas        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    provisioned_at timestamptz,
    schema_recreated_at timestamptz,
    schema_recreated_ack text,
    deleted_at    timestamptz
);
CREATE UNIQUE INDEX tenants_schema_with_data ON tenants (schema_name) WHERE state NOT IN ('dropped', 'archived');
CREATE UNIQUE INDEX tenants_name_with_data ON tenants (namespace, name) WHERE state NOT IN ('dropped', 'archived');

-- Tenant schema migrations applied, with the checksum of the text that ran.
CREATE TABLE tenant_migrations (
    tenant_id  uuid NOT NULL REFERENCES tenants (id),
    version    text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, version)
);
