"""Fixed-grid Adams methods (explicit_adams, implicit_adams / fixed_adams)."""
