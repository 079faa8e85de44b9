"""MLflow: the project's store, stage runs and training runs (needs only the config)."""
