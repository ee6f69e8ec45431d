"""Stage 1, collect: config, plan, the collector actor and the driver that writes the store."""
