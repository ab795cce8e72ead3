"""sora: being implemented (see its issue)."""
