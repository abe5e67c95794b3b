"""What drives the service from outside: the gRPC servicers (grpc/) and the CLI (cli.py)."""
