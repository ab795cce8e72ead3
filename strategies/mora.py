"""mora: being implemented (see its issue)."""
