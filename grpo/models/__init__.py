"""Models and checkpoints: loading a model source (loading.py), checkpoint folders with their optimizer state
(checkpoints.py), LoRA adapters (lora.py), the policy and reference an update trains against (training.py),
atomic writes of every output (atomic.py) and the in-memory checkpoint cache a long-lived worker holds
(cache.py)."""
