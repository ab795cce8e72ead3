"""allora: being implemented (see its issue)."""
