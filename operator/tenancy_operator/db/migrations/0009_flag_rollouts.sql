-- Stepped flag rollouts: the operator's own steps and rollbacks are audited as `rollout`, with
-- the operator as the actor and the reason in changed_by.
ALTER TABLE feature_flag_changes DROP CONSTRAINT IF EXISTS feature_flag_changes_operation_check;
ALTER TABLE feature_flag_changes ADD CONSTRAINT feature_flag_changes_operation_check
    CHECK (operation IN ('create', 'update', 'delete', 'repair', 'rollout'));
