"""What drives the service from outside: the gRPC servicer (grpc/) and the CLI (cli.py)."""
