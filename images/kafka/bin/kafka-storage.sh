#!/bin/sh
# kafka-storage.sh format|info|random-uuid ...: formats a KRaft log directory.
exec "$(dirname -- "$0")/kafka-run-class.sh" kafka.tools.StorageTool "$@"
