#!/bin/sh
# The grafana service's entrypoint: no start without an admin password of the operator's own,
# then Grafana's own entrypoint. Compose cannot require the variable for the observability
# profile alone: a ${GRAFANA_ADMIN_PASSWORD:?} would fail every `docker compose up`, with the
# profile or without.
case "${GF_SECURITY_ADMIN_PASSWORD:-}" in
    "" | admin)
        echo "grafana: set GRAFANA_ADMIN_PASSWORD (not empty, not admin); see README.md" >&2
        exit 78
        ;;
esac
exec /run.sh "$@"
