"""One module per DVC stage: parse args -> read inputs -> call grpo -> write outputs atomically."""
