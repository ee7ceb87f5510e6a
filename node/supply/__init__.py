"""Where a model's bytes come from: sources, the lock file, registries, download, the store, bundles, pull."""
