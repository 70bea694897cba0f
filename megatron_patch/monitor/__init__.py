"""Training-stability diagnostics: per-layer statistics and (later) spike detection."""
