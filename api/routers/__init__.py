"""One router per resource: ``health``, ``jobs``, ``sweeps``, ``measure``."""
