"""Applications. Each module has `run(config, workdir) -> dict` (the metrics it wrote)."""
