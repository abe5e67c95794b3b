"""gRPC entrypoint of the notifications service."""
