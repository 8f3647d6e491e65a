"""Command line, benchmarks and daemon."""
