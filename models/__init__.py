"""Model registry: specs, networks and shipped weights."""
