"""Kopf handlers: thin. They parse, lock, call a reconciler, and report (status, Events, metrics)."""
