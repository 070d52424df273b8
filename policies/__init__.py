"""Declarative selection policies: schema, validation, reload (not built yet)."""
