"""Optional rollout backends that need extra packages (imported on demand)."""
