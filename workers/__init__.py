"""Everything that runs on a Ray Train worker: data, plain models, the DeepSpeed engine, the per-worker loop, and the worker side of advice (observe, link to the coordinator, probation, blending)."""
