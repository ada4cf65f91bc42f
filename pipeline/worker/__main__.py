"""python -m pipeline.worker [--stop] [--cache-gb N] [--idle-timeout S]: see pipeline/worker/server.py."""

from pipeline.worker.server import main

main()
