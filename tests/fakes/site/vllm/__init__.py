"""Stand-in package: only the entry point the node launches (see tests/fakes/)."""
