#!/bin/sh
# kafka-server-start.sh server.properties [--override key=value ...]: the broker (KRaft), in
# the foreground. Heap: KAFKA_HEAP_OPTS, default -Xmx1G -Xms1G as in Kafka's script; logs:
# config/log4j2.properties (INFO to stdout; KAFKA_LOG_LEVEL) unless KAFKA_LOG4J_OPTS says.
set -eu
if [ $# -lt 1 ]; then
    echo "usage: $0 server.properties [--override property=value]..." >&2
    exit 1
fi
base_dir=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)
: "${KAFKA_HEAP_OPTS:=-Xmx1G -Xms1G}"
: "${KAFKA_LOG4J_OPTS:=-Dlog4j2.configurationFile=$base_dir/config/log4j2.properties}"
export KAFKA_HEAP_OPTS KAFKA_LOG4J_OPTS
exec "$base_dir/bin/kafka-run-class.sh" kafka.Kafka "$@"
