"""The algorithm: group advantages, KL estimators, the clipped policy loss, token log-probs, shared-prefix
packing and the update loop that puts them together (pure functions on tensors; no I/O)."""
