#!/bin/bash
# Starts caroni-node, then loads the demo fixtures once it answers
# (idempotent: templates are replaced, job types added or updated).
# CARONI_FIXTURES: space-separated job-type files under examples/jobtypes to
# load on an agent; CARONI_TEMPLATES=1 loads the demo templates on a manager.
set -u
# With TLS on the client API, wait (bounded) for its certificate: in the
# compose deployment a one-shot service writes it into a shared volume.
if [ -n "${CARONI_API_TLS_CERT:-}" ]; then
  for ((i = 0; i < 600; i++)); do
    [ -s "$CARONI_API_TLS_CERT" ] && [ -s "${CARONI_API_TLS_KEY:-/nonexistent}" ] && break
    sleep 0.1
  done
fi
# An empty CARONI_MESH_KEY means no private mesh.
[ -n "${CARONI_MESH_KEY:-}" ] || unset CARONI_MESH_KEY
caroni-node "$@" &
node=$!
trap 'kill -TERM $node; wait $node; exit $?' TERM INT
for ((i = 0; i < 600; i++)); do
  caroni health >/dev/null 2>&1 && break
  sleep 0.1
done
ex=/opt/caroni/examples
if [ "${CARONI_TEMPLATES:-0}" = 1 ]; then
  caroni template add test_simple "$ex/templates/test_simple.cwl" >/dev/null
  caroni template add diamond "$ex/templates/diamond.cwl" >/dev/null
fi
for f in ${CARONI_FIXTURES:-}; do
  caroni jobtype add "$ex/jobtypes/$f" >/dev/null 2>&1 || caroni jobtype update "$ex/jobtypes/$f" >/dev/null
done
wait $node
