"""The HTTP layer: thin handlers that parse, call the execution service, serialise."""
