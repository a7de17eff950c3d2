#!/bin/sh
# Creates the role the services log in as (app-role.sql). The postgres image runs this once, on
# an empty volume, from /docker-entrypoint-initdb.d; on a volume made before it existed, run it
# by hand: docker compose exec postgres sh /docker-entrypoint-initdb.d/10-app-role.sh
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v app_role="${UPGATES_DB_USER:-upgates_app}" \
    -v app_password="${UPGATES_DB_PASSWORD:?set UPGATES_DB_PASSWORD}" \
    -f "${APP_ROLE_SQL:-/etc/upgates/app-role.sql}"
