"""dylora: being implemented (see its issue)."""
