"""Shared pytest fixtures. Keep this file cheap to import: every test run loads it."""

from tests.mlflow_server import mlflow_server  # noqa: F401  (fixture: a real `mlflow server` on 127.0.0.1)
