"""PostgreSQL access: connection pools per target, the control schema, and SQL per concern."""
