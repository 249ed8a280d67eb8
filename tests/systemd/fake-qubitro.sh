#!/bin/sh
# Stand-in for the fake-qubitro binary in service-test.sh --self-test: the
# harness only needs it to start and print its "listening" line.
echo "fake-qubitro listening on http://127.0.0.1:8080 (sh stand-in)"
exec sleep infinity
