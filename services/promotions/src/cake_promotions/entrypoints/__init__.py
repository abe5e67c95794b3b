"""What drives the service from outside: the gRPC servicer (grpc/), the Kafka handlers
(kafka.py) and the CLI (cli.py)."""
