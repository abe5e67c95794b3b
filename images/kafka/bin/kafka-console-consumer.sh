#!/bin/sh
# kafka-console-consumer.sh --bootstrap-server HOST:PORT --topic TOPIC ...
exec "$(dirname -- "$0")/kafka-run-class.sh" \
    org.apache.kafka.tools.consumer.ConsoleConsumer "$@"
