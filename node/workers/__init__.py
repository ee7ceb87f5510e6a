"""How a model runs: states, GPUs (NVML), placement, the supervisor, replicas, keepers, probes, the router."""
