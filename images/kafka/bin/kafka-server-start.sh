#!/bin/sh
# kafka-server-start.sh server.properties [--override key=value ...]: the broker (KRaft), in
# the foreground. Heap: KAFKA_HEAP_OPTS, default -Xmx1G -Xms1G as in Kafka's script.
set -eu
if [ $# -lt 1 ]; then
    echo "usage: $0 server.properties [--override property=value]..." >&2
    exit 1
fi
: "${KAFKA_HEAP_OPTS:=-Xmx1G -Xms1G}"
export KAFKA_HEAP_OPTS
exec "$(dirname -- "$0")/kafka-run-class.sh" kafka.Kafka "$@"
