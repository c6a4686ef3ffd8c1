"""What runs on the training workers: plain models, data loading, and the per-worker loop."""
