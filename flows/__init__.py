"""Prefect flows that run the DVC stages (they never re-implement a stage)."""
