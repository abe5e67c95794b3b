"""gRPC entrypoint of the bank simulator."""
