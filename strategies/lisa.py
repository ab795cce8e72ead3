"""lisa: being implemented (see its issue)."""
