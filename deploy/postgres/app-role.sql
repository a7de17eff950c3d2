-- The role the services log in as (DATABASE_URL): it owns the application's tables, so that the
-- workers can create and migrate them, and is no superuser, so that a compromised service cannot
-- read files, run programs or touch other databases. The superuser stays for administration.
--
-- Run by app-role.sh, in the application's database, with the psql variables app_role and
-- app_password. Safe to run again, and how a deployment whose services used the superuser is
-- upgraded: the tables that already exist are handed to the role.

SELECT format('CREATE ROLE %I LOGIN', :'app_role')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'app_role') \gexec

ALTER ROLE :"app_role" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'app_password';

-- TEMPORARY: a worker copies each batch into a session-local table before applying it.
GRANT CONNECT, TEMPORARY ON DATABASE :"DBNAME" TO :"app_role";
GRANT USAGE, CREATE ON SCHEMA public TO :"app_role";

-- Tables made before the role existed: a migration alters its tables, which takes their owner.
-- A table's indexes and its columns' sequences change owner with it.
SELECT format('ALTER TABLE %I.%I OWNER TO %I', n.nspname, c.relname, :'app_role')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
    AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = :'app_role') \gexec

SELECT format('ALTER SEQUENCE %I.%I OWNER TO %I', n.nspname, c.relname, :'app_role')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind = 'S'
    AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = :'app_role') \gexec
