-- The helpers Citus's failure tests call, with the same signatures and behaviour, talking to
-- a wirefault proxy instead of Citus's mitmproxy script.
--
--   SET citus.mitmfifo = '/tmp/wirefault.fifo';
--   SELECT * FROM citus.mitmproxy('conn.onQuery(query="^COMMIT").kill()');  -- one row: ''
--   SELECT citus.clear_network_traffic();
--   SELECT * FROM citus.dump_network_traffic();                            -- conn, source, message
--
-- A rejected command comes back as its error line in the result row, not as an SQL error.
-- They exchange through server-side COPY TO / COPY FROM the FIFO, so the caller needs
-- superuser or pg_write_server_files + pg_read_server_files, and the server's OS account
-- must be able to open the FIFO. Like Citus's originals they block while no proxy serves
-- the FIFO (see wirefault.sql for helpers with a timeout) and create ON COMMIT DROP temporary
-- tables, so call each at most once per transaction.
--
-- A blocked call waits inside open() of the FIFO, where PostgreSQL restarts the system call
-- after every signal: pg_cancel_backend and pg_terminate_backend return true but the backend
-- stays active until something opens the FIFO. To avoid it, start the suite only once a
-- proxy answers:
--
--   wirefault wait-ready --fifo /tmp/wirefault.fifo --timeout 30
--
-- To free a backend already stuck, in COPY TO or COPY FROM alike: cancel it, then open the
-- FIFO once for reading and writing (that never blocks, and it wakes a blocked reader and a
-- blocked writer), as root or the FIFO's owner on the database host; the call then fails
-- with "canceling statement due to user request" and the session stays usable:
--
--   psql -c "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query ~ 'citus\.(mitmproxy|clear_network_traffic|dump_network_traffic)\(' AND pid <> pg_backend_pid()" && : <> /tmp/wirefault.fifo

CREATE SCHEMA IF NOT EXISTS citus;

CREATE OR REPLACE FUNCTION citus.mitmproxy(text) RETURNS TABLE(result text) AS $$
DECLARE
  command ALIAS FOR $1;
BEGIN
  CREATE TEMPORARY TABLE mitmproxy_command (command text) ON COMMIT DROP;
  CREATE TEMPORARY TABLE mitmproxy_result (res text) ON COMMIT DROP;

  INSERT INTO mitmproxy_command VALUES (command);

  -- COPY writes the command with a trailing newline and its backslashes doubled; the
  -- proxy's parser reads string literals like Python, which undoes the doubling.
  EXECUTE format('COPY mitmproxy_command TO %L', current_setting('citus.mitmfifo'));
  EXECUTE format('COPY mitmproxy_result FROM %L', current_setting('citus.mitmfifo'));

  RETURN QUERY SELECT * FROM mitmproxy_result;
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION citus.clear_network_traffic() RETURNS void AS $$
BEGIN
  PERFORM citus.mitmproxy('recorder.reset()');
  RETURN;
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION citus.dump_network_traffic()
RETURNS TABLE(conn int, source text, message text) AS $$
BEGIN
  CREATE TEMPORARY TABLE mitmproxy_command (command text) ON COMMIT DROP;
  CREATE TEMPORARY TABLE mitmproxy_result (
    conn int, source text, message text
  ) ON COMMIT DROP;

  INSERT INTO mitmproxy_command VALUES ('recorder.dump()');

  EXECUTE format('COPY mitmproxy_command TO %L', current_setting('citus.mitmfifo'));
  EXECUTE format('COPY mitmproxy_result FROM %L', current_setting('citus.mitmfifo'));

  RETURN QUERY SELECT * FROM mitmproxy_result;
END;
$$ LANGUAGE plpgsql;
