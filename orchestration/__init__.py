"""Experiments: config, the `hybridtrain` command, running and predicting (and, with the advisor, the coordinator)."""
