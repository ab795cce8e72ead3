"""loraprune: being implemented (see its issue)."""
