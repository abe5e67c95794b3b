"""gRPC entry points: map messages to use cases and back, nothing else."""
