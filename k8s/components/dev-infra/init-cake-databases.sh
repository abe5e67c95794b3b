#!/bin/sh
# Runs once, on an empty data directory (/docker-entrypoint-initdb.d of the postgres image):
# the databases and least-privilege roles of cake_devtools.stack.postgres (cake_payments: the
# bank simulator's ledger, components/bank-simulator). Each service role
# owns its database and nothing else; cake_relay may only connect to the two databases with
# an outbox (the services' migrations grant it that table); CONNECT is revoked from PUBLIC.
set -eu

psql --no-psqlrc --set ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    --set auth_password="$CAKE_AUTH_PASSWORD" \
    --set promotions_password="$CAKE_PROMOTIONS_PASSWORD" \
    --set events_password="$CAKE_EVENTS_PASSWORD" \
    --set relay_password="$CAKE_RELAY_PASSWORD" \
    --set payments_password="$CAKE_PAYMENTS_PASSWORD" \
    --set notifications_password="$CAKE_NOTIFICATIONS_PASSWORD" <<'SQL'
CREATE ROLE cake_auth LOGIN PASSWORD :'auth_password';
CREATE ROLE cake_promotions LOGIN PASSWORD :'promotions_password';
CREATE ROLE cake_events LOGIN PASSWORD :'events_password';
CREATE ROLE cake_relay LOGIN PASSWORD :'relay_password';
CREATE ROLE cake_payments LOGIN PASSWORD :'payments_password';
CREATE ROLE cake_notifications LOGIN PASSWORD :'notifications_password';

CREATE DATABASE cake_auth OWNER cake_auth ENCODING 'UTF8' TEMPLATE template0;
CREATE DATABASE cake_promotions OWNER cake_promotions ENCODING 'UTF8' TEMPLATE template0;
CREATE DATABASE cake_events OWNER cake_events ENCODING 'UTF8' TEMPLATE template0;
CREATE DATABASE cake_payments OWNER cake_payments ENCODING 'UTF8' TEMPLATE template0;
CREATE DATABASE cake_notifications OWNER cake_notifications ENCODING 'UTF8' TEMPLATE template0;

REVOKE CONNECT, TEMPORARY ON DATABASE cake_auth, cake_promotions, cake_events, cake_payments,
    cake_notifications FROM PUBLIC;
REVOKE CONNECT, TEMPORARY ON DATABASE postgres, template1 FROM PUBLIC;
GRANT CONNECT ON DATABASE cake_auth TO cake_relay;
GRANT CONNECT ON DATABASE cake_promotions TO cake_relay;

\connect cake_auth
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
\connect cake_promotions
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
\connect cake_events
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
\connect cake_payments
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
\connect cake_notifications
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
