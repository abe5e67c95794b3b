#!/bin/sh
# kafka-consumer-groups.sh --bootstrap-server HOST:PORT --list|--describe ...
exec "$(dirname -- "$0")/kafka-run-class.sh" \
    org.apache.kafka.tools.consumer.group.ConsumerGroupCommand "$@"
