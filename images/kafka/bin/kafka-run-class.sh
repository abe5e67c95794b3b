#!/bin/sh
# kafka-run-class.sh CLASS [ARGS...]: runs a class of the Kafka jars in /opt/kafka/libs with
# the JVM options of Apache Kafka's own script, from the same environment variables:
#   KAFKA_HEAP_OPTS            heap (default -Xmx256M; kafka-server-start.sh: -Xmx1G -Xms1G)
#   KAFKA_JVM_PERFORMANCE_OPTS GC and JIT flags (default: G1 with a 20 ms pause goal)
#   KAFKA_OPTS                 anything else for the JVM
#   KAFKA_LOG4J_OPTS           logging (default: config/tools-log4j2.properties, warnings to
#                              stderr; kafka-server-start.sh: config/log4j2.properties)
#   LOG_DIR                    kafka.logs.dir for a log4j config that writes files
#   JAVA_HOME                  a JRE other than the image's
# The image's distribution has no Kafka tarball (it is built from Maven Central's jars), so
# this and the other scripts here are its own, named like Kafka's.
set -eu
base_dir=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)
if [ $# -lt 1 ]; then
    echo "usage: $0 CLASS [ARGS...]" >&2
    exit 2
fi
java=java
if [ -n "${JAVA_HOME:-}" ]; then
    java="$JAVA_HOME/bin/java"
fi
: "${LOG_DIR:=/tmp/kafka-logs}"
: "${KAFKA_HEAP_OPTS:=-Xmx256M}"
: "${KAFKA_JVM_PERFORMANCE_OPTS:=-server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true}"
: "${KAFKA_LOG4J_OPTS:=-Dlog4j2.configurationFile=$base_dir/config/tools-log4j2.properties}"
# The option variables are lists of words, as in Kafka's script.
# shellcheck disable=SC2086
exec "$java" $KAFKA_HEAP_OPTS $KAFKA_JVM_PERFORMANCE_OPTS "-Dkafka.logs.dir=$LOG_DIR" \
    $KAFKA_LOG4J_OPTS ${KAFKA_OPTS:-} -cp "$base_dir/libs/*" "$@"
