"""What the node and the workers share: settings, errors, logs, jobs, the database, leases, the queue, storage, audit.

The bottom layer: it imports nothing else of ours (import contract in pyproject.toml).
"""
