"""The ML library: pure PyTorch/data code that knows nothing of Dagster, MLflow or DVC."""
