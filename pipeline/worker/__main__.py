"""python -m pipeline.worker [--stop] [--cache-gb N]: see pipeline/worker/server.py."""

from pipeline.worker.server import main

main()
