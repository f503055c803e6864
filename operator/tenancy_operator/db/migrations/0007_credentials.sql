-- Owner and login roles apart, role-swap rotation: which login role the Secret names now, and the
-- previous login whose retirement is due after the grace period (kept here so that it survives a
-- restart of the operator; the sweep acts on it).
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS login_slot text CHECK (login_slot IN ('a', 'b'));
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS retiring_role text;
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS retire_at timestamptz;
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS rotated_at timestamptz;
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS ro_secret_uid text;
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS ro_secret_claim text;
