"""One reconciler per kind: observe, decide, apply, and the outcome the handlers report."""
