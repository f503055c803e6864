"""FeatureFlag handlers (not implemented yet)."""

from __future__ import annotations

import kopf

from tenancy_operator.runtime_context import OperatorContext

KIND = "FeatureFlag"


def create_service(ctx: OperatorContext) -> None:
    return None


def register(registry: kopf.OperatorRegistry) -> None:
    """Attach the FeatureFlag handlers to ``registry``."""
