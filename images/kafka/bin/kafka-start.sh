#!/bin/sh
# kafka-start.sh [server.properties]: the image's default command. Formats the log directory
# unless it is already (KAFKA_CLUSTER_ID: any base64 UUID, fixed for the volume's lifetime),
# then runs the broker. The dev cluster's StatefulSet runs the same two steps itself.
set -eu
bin=$(dirname -- "$0")
config=${1:-/opt/kafka/config/server.properties}
"$bin/kafka-storage.sh" format --ignore-formatted \
    --cluster-id "${KAFKA_CLUSTER_ID:-eQD3J3MxSTyRwCtuIjIm_w}" --config "$config"
exec "$bin/kafka-server-start.sh" "$config"
