#!/usr/bin/env bash
# Entrypoint of cake-postgres: what the official postgres image's entrypoint does that the dev
# manifests rely on, for a non-root user (the image's postgres, uid 999) only.
#
#   docker-entrypoint.sh [postgres] [SERVER FLAGS...]   e.g.  -c max_connections=200
#
# On an empty PGDATA (default /var/lib/postgresql/data; it may be a subdirectory of a mounted
# volume, it is created 0700) it first initialises the cluster:
#   - initdb, UTF-8 with the C.UTF-8 locale, superuser POSTGRES_USER (default postgres) with
#     the password POSTGRES_PASSWORD (required, unless POSTGRES_HOST_AUTH_METHOD=trust);
#     POSTGRES_INITDB_ARGS are added to initdb's arguments;
#   - local (socket) connections are trusted; TCP connections from anywhere need a password
#     (POSTGRES_HOST_AUTH_METHOD, default scram-sha-256); the server listens on all addresses;
#   - a temporary server listening on its socket only runs /docker-entrypoint-initdb.d/* in
#     name order: *.sh executed if executable, sourced otherwise; *.sql and *.sql.gz through
#     psql as POSTGRES_USER (ON_ERROR_STOP) in POSTGRES_DB, which is created if it is not
#     `postgres` (default: POSTGRES_USER). POSTGRES_USER, POSTGRES_DB and POSTGRES_PASSWORD
#     are exported to the scripts, and so is every variable of the container.
# Then it replaces itself with the server (`exec postgres FLAGS...`), which stops on SIGINT
# (fast) or SIGTERM (smart). Any other command, and `postgres --version`/`--help`/`-C ...`,
# runs as given.
set -Eeuo pipefail

say() { printf 'cake-postgres: %s\n' "$*"; }
die() { printf 'cake-postgres: ERROR: %s\n' "$*" >&2; exit 1; }

# Flags alone mean "the server with these flags", as in the official image.
if [[ $# -eq 0 || ${1:0:1} == "-" ]]; then
    set -- postgres "$@"
fi
if [[ $1 != postgres ]]; then
    exec "$@"
fi
# Asking the server about itself needs no data directory.
for argument in "$@"; do
    case $argument in
        -'?' | --help | -V | --version | --describe-config | -C | -C*) exec "$@" ;;
    esac
done

[[ $(id -u) -ne 0 ]] || die "runs as a non-root user only (the image's postgres user is 999)"
getent passwd "$(id -u)" >/dev/null \
    || die "uid $(id -u) has no entry in /etc/passwd: run as the image's postgres user (999)"

export PGDATA="${PGDATA:-/var/lib/postgresql/data}"
export POSTGRES_USER="${POSTGRES_USER:-postgres}"
export POSTGRES_DB="${POSTGRES_DB:-$POSTGRES_USER}"
export POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-}"
POSTGRES_HOST_AUTH_METHOD="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}"

initialise() {
    if [[ -z $POSTGRES_PASSWORD && $POSTGRES_HOST_AUTH_METHOD != trust ]]; then
        die "the database is uninitialised and POSTGRES_PASSWORD is not set (set it, or" \
            "POSTGRES_HOST_AUTH_METHOD=trust to allow every connection without one)"
    fi
    say "initialising ${PGDATA} (superuser ${POSTGRES_USER})"
    local pwfile
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS are words, as in the official image
    initdb --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
        --encoding=UTF8 --locale=C.UTF-8 --auth-local=trust \
        --auth-host="$POSTGRES_HOST_AUTH_METHOD" ${POSTGRES_INITDB_ARGS:-}
    rm -f "$pwfile"
    printf '\nhost all all all %s\n' "$POSTGRES_HOST_AUTH_METHOD" >>"$PGDATA/pg_hba.conf"
    printf "\nlisten_addresses = '*'\n" >>"$PGDATA/postgresql.auto.conf"

    # Socket only: nobody reaches the server over the network before the scripts are done.
    pg_ctl --pgdata="$PGDATA" --wait --silent \
        --options="-c listen_addresses='' -p ${PGPORT:-5432}" start
    local psql=(psql --no-psqlrc --no-password --set ON_ERROR_STOP=1
        --username "$POSTGRES_USER")
    if [[ $POSTGRES_DB != postgres ]]; then
        "${psql[@]}" --dbname postgres --set db="$POSTGRES_DB" \
            <<<'CREATE DATABASE :"db";'
    fi
    local script
    for script in /docker-entrypoint-initdb.d/*; do
        [[ -e $script ]] || continue
        case $script in
            *.sh)
                if [[ -x $script ]]; then
                    say "running $script"
                    "$script"
                else
                    say "sourcing $script"
                    # shellcheck disable=SC1090
                    . "$script"
                fi
                ;;
            *.sql) say "running $script"; "${psql[@]}" --dbname "$POSTGRES_DB" -f "$script" ;;
            *.sql.gz) say "running $script"; gunzip -c "$script" | "${psql[@]}" --dbname "$POSTGRES_DB" ;;
            *) say "ignoring $script" ;;
        esac
    done
    pg_ctl --pgdata="$PGDATA" --wait --silent --mode=fast stop
    say "initialised; starting the server"
}

if ! mkdir -p "$PGDATA" 2>/dev/null || [[ ! -w $PGDATA ]]; then
    die "uid $(id -u) cannot create or write ${PGDATA}: its volume must be writable by the" \
        "postgres user (fsGroup 999, or a directory it owns)"
fi
chmod 0700 "$PGDATA" 2>/dev/null || true
if [[ ! -s $PGDATA/PG_VERSION ]]; then
    initialise
fi
unset POSTGRES_PASSWORD
exec "$@"
