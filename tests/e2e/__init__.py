"""End-to-end tests: real processes (python -m kimi.X, torchrun, signals) and real services (MLflow)."""
