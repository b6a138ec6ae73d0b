"""The operator console: server-rendered pages over the system of record (`pacsai web`, or beside the node)."""
