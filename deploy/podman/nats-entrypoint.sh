#!/bin/sh
# The official nats image's entrypoint: arguments that start with a flag are nats-server's.
set -e
if [ "${1#-}" != "$1" ]; then
  set -- nats-server "$@"
fi
exec "$@"
