"""Feature flag evaluation, bucketing and flagd export: pure functions, no I/O.

`evaluate(flag, tenant, user)` implements the FeatureFlag precedence (kill switch, user override,
tenant override, rollout, default) with flagd-compatible sticky bucketing; `flagd_document`
exports the same flag for OpenFeature flagd providers.
"""

from tenancy_operator.flags.bucketing import bucket_hash, bucketing_bytes, fractional, pick
from tenancy_operator.flags.diff import json_diff, summarize
from tenancy_operator.flags.evaluation import Evaluation, Reason, evaluate
from tenancy_operator.flags.flagd import FLAGD_SCHEMA, TENANT_ATTRIBUTE, flagd_document, flagd_flag, targeting
from tenancy_operator.flags.model import FlagDefinition, Rollout, TenantRule

__all__ = [
    "FLAGD_SCHEMA",
    "TENANT_ATTRIBUTE",
    "Evaluation",
    "FlagDefinition",
    "Reason",
    "Rollout",
    "TenantRule",
    "bucket_hash",
    "bucketing_bytes",
    "evaluate",
    "flagd_document",
    "flagd_flag",
    "fractional",
    "json_diff",
    "pick",
    "summarize",
    "targeting",
]
