"""A long-lived process that runs the pipeline's stages for `dvc repro`, with torch and transformers imported
and the latest checkpoints held in memory (grpo.models.cache.CheckpointCache): a stage then skips its
interpreter start, its imports and most model loads. Its outputs are the same bytes as the stage run on its own
(tests/test_worker.py), so DVC's cache stays valid either way.

    dvc repro                            # the first stage starts a worker; it exits when idle (120 s)
    python -m pipeline.worker --stop     # or at once
    GRPO_WORKER=off dvc repro            # a process per stage, no worker

    client.py   the stage's side: a stage started as `python -m pipeline.<stage> ...` (dvc.yaml's commands)
                starts the worker if none serves its folder, sends its arguments to the worker's socket, relays
                the output and exits with the stage's status
    server.py   the worker's side: the socket server that runs the stages in its own process

The stages import client.py only; server.py imports the stages (by name, when it starts): no cycle.
"""
