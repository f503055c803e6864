-- Feature flags declared by FeatureFlag objects, one set of rows per flag, in every target.
-- A flag is identified by its namespace and key (two namespaces may use the same key); `name` is
-- the FeatureFlag object that owns it. Levels: one 'global' row (kill switch, variants, default,
-- rollout), one 'tenant' row per tenant override, one 'user' row per user override. The operator
-- replaces all rows of a flag in one transaction, so one SELECT always sees a whole flag.
CREATE TABLE feature_flags (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    namespace          text NOT NULL,
    flag_key           text NOT NULL,
    level              text NOT NULL CHECK (level IN ('global', 'tenant', 'user')),
    tenant             text,            -- Tenant name (tenant and user rows); NULL on the global row
    user_id            text,            -- the user's targeting key (user rows)
    name               text NOT NULL,   -- the FeatureFlag object
    k8s_uid            text NOT NULL,
    generation         bigint NOT NULL, -- metadata.generation written
    enabled            boolean,         -- global: false is the kill switch
    variant            text,            -- global: rollout variant; tenant: variant served; user: variant
    rollout_percentage smallint CHECK (rollout_percentage BETWEEN 0 AND 100),
                                        -- global: share getting `variant`; tenant: share of its users
    weights            jsonb,           -- global: weighted rollout [{"variant": .., "weight": ..}] in bucket order
    default_variant    text,            -- global
    variants           jsonb,           -- global: variant name -> JSON value
    description        text,
    written_at         timestamptz NOT NULL DEFAULT now(),
    CHECK ((level = 'global') = (tenant IS NULL)),
    CHECK ((level = 'user') = (user_id IS NOT NULL)),
    CHECK (level <> 'global' OR (enabled IS NOT NULL AND default_variant IS NOT NULL AND variants IS NOT NULL)),
    CHECK (level = 'global' OR variant IS NOT NULL)
);
CREATE UNIQUE INDEX feature_flags_one_global ON feature_flags (namespace, flag_key) WHERE level = 'global';
CREATE UNIQUE INDEX feature_flags_one_tenant ON feature_flags (namespace, flag_key, tenant) WHERE level = 'tenant';
CREATE UNIQUE INDEX feature_flags_one_user ON feature_flags (namespace, flag_key, tenant, user_id) WHERE level = 'user';

-- Append-only audit trail: one row per change the operator wrote (never deleted by the operator).
CREATE TABLE feature_flag_changes (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    namespace   text NOT NULL,
    flag_key    text NOT NULL,
    name        text NOT NULL,
    k8s_uid     text,
    generation  bigint,
    operation   text NOT NULL CHECK (operation IN ('create', 'update', 'delete', 'repair')),
    change      jsonb NOT NULL,      -- [{"op": add|remove|replace, "path": JSON pointer, "old": .., "new": ..}]
    changed_by  text,                -- field manager of the latest spec change, as Kubernetes tells; NULL if unknown
    changed_at  timestamptz,         -- when Kubernetes recorded that spec change (managedFields time)
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX feature_flag_changes_flag ON feature_flag_changes (namespace, flag_key, id);
