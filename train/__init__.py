"""Training: data, the shared loop, checkpoints, reports, one module per method, and the CLI (python -m train.run)."""
