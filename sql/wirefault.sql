-- SQL helpers for driving a wirefault proxy from a PostgreSQL session, which never hang.
--
--   SET wirefault.fifo = '/tmp/wirefault.fifo';
--   SET wirefault.timeout = 5;                          -- seconds, default 10
--   SELECT wirefault.command('conn.onQuery(query="^COMMIT").kill()');  -- '' when accepted
--   SELECT * FROM wirefault.traffic();                   -- conn, source, message
--   SELECT wirefault.clear_traffic();
--   SELECT wirefault.add_fault('slow', 'onQuery(query="^SELECT").delay(200)');
--   SELECT * FROM wirefault.faults();     -- name, matched, fired, added, state, command
--   SELECT wirefault.remove_fault('slow');
--   SELECT wirefault.clear_faults();
--
-- wirefault.command(text) RETURNS text: '' when the proxy accepts the command; for
-- 'recorder.dump()' the raw COPY text rows, for 'faults.list()' and 'proxy.status()' their
-- key=value lines. A rejected command raises SQLSTATE 22023
-- (invalid_parameter_value) with the proxy's message; no answer within wirefault.timeout
-- raises 08006 (connection_failure) naming the FIFO and the timeout; a FIFO the server's OS
-- account may not open (or reach) raises 42501 (insufficient_privilege), "permission denied".
--
-- How: the exchange runs through COPY ... TO PROGRAM / FROM PROGRAM with coreutils
-- `timeout` around `cat`, because a plain server-side COPY to a FIFO nobody reads blocks
-- in open() for ever and neither statement_timeout nor pg_cancel_backend can interrupt
-- it. This needs superuser or the pg_execute_server_program role, and `timeout`, `cat`
-- and `sh` on the server's PATH. Concurrent callers are serialised per FIFO with a
-- transaction-scoped advisory lock, key (2003201140 = 'wflt', hashtext(fifo path)): it is
-- held until the caller's transaction ends.

CREATE SCHEMA IF NOT EXISTS wirefault;

CREATE OR REPLACE FUNCTION wirefault._shell_quote(value text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
  SELECT '''' || replace(value, '''', '''\''''') || ''''
$$;

-- wirefault.fifo and wirefault.timeout, checked.
CREATE OR REPLACE FUNCTION wirefault._settings(OUT fifo text, OUT seconds numeric)
LANGUAGE plpgsql STABLE AS $$
DECLARE
  timeout_text text := NULLIF(current_setting('wirefault.timeout', true), '');
BEGIN
  fifo := NULLIF(current_setting('wirefault.fifo', true), '');
  IF fifo IS NULL THEN
    RAISE EXCEPTION 'wirefault: no FIFO configured'
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'SET wirefault.fifo = ''/path/of/the/proxy.fifo''';
  END IF;
  BEGIN
    seconds := coalesce(timeout_text::numeric, 10);
  EXCEPTION WHEN invalid_text_representation THEN
    seconds := NULL;
  END;
  IF seconds IS NULL OR seconds <= 0 THEN
    RAISE EXCEPTION 'wirefault: wirefault.timeout must be a number of seconds > 0, not %',
      quote_literal(timeout_text) USING ERRCODE = 'invalid_parameter_value';
  END IF;
END;
$$;

-- Seconds until the deadline, for `timeout` (at least 50 ms, so a late caller still tries).
CREATE OR REPLACE FUNCTION wirefault._seconds_left(deadline timestamptz) RETURNS text
LANGUAGE sql VOLATILE AS $$
  SELECT round(greatest(0.05, extract(epoch FROM deadline - clock_timestamp()))::numeric, 3)::text
$$;

-- One exchange at a time per FIFO, across sessions; gives up at the deadline.
CREATE OR REPLACE FUNCTION wirefault._lock(fifo text, deadline timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  WHILE NOT pg_try_advisory_xact_lock(2003201140, hashtext(fifo)) LOOP
    IF clock_timestamp() >= deadline THEN
      RAISE EXCEPTION 'wirefault: FIFO % stayed busy: another session is talking to the proxy',
        fifo USING ERRCODE = 'lock_not_available';
    END IF;
    PERFORM pg_sleep(0.005);
  END LOOP;
END;
$$;

-- An empty temporary table of the given shape (created ON COMMIT DROP when missing).
CREATE OR REPLACE FUNCTION wirefault._fresh_table(name text, columns text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  IF to_regclass('pg_temp.' || quote_ident(name)) IS NULL THEN
    EXECUTE format('CREATE TEMPORARY TABLE %I (n bigint GENERATED ALWAYS AS IDENTITY, %s) '
                   'ON COMMIT DROP', name, columns);
  ELSE
    EXECUTE format('TRUNCATE pg_temp.%I', name);
  END IF;
END;
$$;

-- Send `command`; COPY the reply into pg_temp.wirefault_traffic (conn, source, message) when
-- `traffic`, else line by line, untouched, into pg_temp.wirefault_reply (line).
CREATE OR REPLACE FUNCTION wirefault._exchange(command text, traffic boolean) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  settings record := wirefault._settings();
  deadline timestamptz := clock_timestamp() + settings.seconds * interval '1 second';
  fifo text := wirefault._shell_quote(settings.fifo);
  -- Run before each open, as the server's OS account, so a FIFO it may not open fails at
  -- once and says why: exit 3 not a FIFO, or missing; 5 the deepest directory on the way
  -- that exists cannot be searched; 4 no read and write permission on the FIFO itself (the
  -- command goes out and the reply comes back through it, so both are checked first).
  is_fifo text := '[ -p "$1" ] || { d=$1; while [ ! -e "$d" ]; do case $d in */*) '
                  'd=${d%/*}; d=${d:-/};; *) d=.;; esac; done; '
                  '[ "$d" != "$1" ] && [ -d "$d" ] && [ ! -x "$d" ] && exit 5; exit 3; }; '
                  '[ -r "$1" ] && [ -w "$1" ] || exit 4; ';
  access_hint constant text := 'Start the proxy with --fifo-group <the server''s group> '
    '--fifo-mode 0660, in a directory the server can search.';
  program text;
  detail text;
BEGIN
  PERFORM wirefault._lock(settings.fifo, deadline);
  IF traffic THEN
    PERFORM wirefault._fresh_table('wirefault_traffic', 'conn int, source text, message text');
  ELSE
    PERFORM wirefault._fresh_table('wirefault_reply', 'line text');
  END IF;
  BEGIN
    -- `timeout` wraps the shell that opens the FIFO: the open is what blocks.
    program := format('exec timeout %s sh -c %s wirefault %s', wirefault._seconds_left(deadline),
                      wirefault._shell_quote(is_fifo || 'exec cat > "$1"'), fifo);
    EXECUTE format('COPY (SELECT %L::text) TO PROGRAM %L', command, program);
    program := format('exec timeout %s sh -c %s wirefault %s', wirefault._seconds_left(deadline),
                      wirefault._shell_quote(is_fifo || 'exec cat "$1"'), fifo);
    IF traffic THEN
      EXECUTE format('COPY pg_temp.wirefault_traffic (conn, source, message) '
                     'FROM PROGRAM %L', program);
    ELSE
      -- CSV with delimiter and quote characters that never occur: every line arrives
      -- whole, without COPY's backslash processing.
      EXECUTE format('COPY pg_temp.wirefault_reply (line) FROM PROGRAM %L WITH (FORMAT csv, '
                     'DELIMITER E''\x01'', QUOTE E''\x02'', FORCE_NOT_NULL (line))', program);
    END IF;
  EXCEPTION WHEN external_routine_exception THEN
    GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
    IF detail LIKE '%exit code 3' THEN
      RAISE EXCEPTION 'wirefault: % is not a FIFO (or does not exist)', settings.fifo
        USING ERRCODE = 'connection_failure';
    ELSIF detail LIKE '%exit code 4' THEN
      RAISE EXCEPTION 'wirefault: permission denied: the database server''s OS account cannot '
        'read and write FIFO %', settings.fifo
        USING ERRCODE = 'insufficient_privilege', HINT = access_hint;
    ELSIF detail LIKE '%exit code 5' THEN
      RAISE EXCEPTION 'wirefault: permission denied: the database server''s OS account cannot '
        'reach FIFO % (a directory on its path is not searchable)', settings.fifo
        USING ERRCODE = 'insufficient_privilege', HINT = access_hint;
    ELSIF detail LIKE '%exit code 127' THEN
      RAISE EXCEPTION 'wirefault: the server cannot run sh, timeout or cat'
        USING ERRCODE = 'connection_failure', DETAIL = detail;
    END IF;
    RAISE EXCEPTION 'wirefault: no proxy answered on FIFO % within % s', settings.fifo,
      settings.seconds USING ERRCODE = 'connection_failure', DETAIL = detail;
  END;
END;
$$;

CREATE OR REPLACE FUNCTION wirefault.command(command text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  reply text;
BEGIN
  PERFORM wirefault._exchange(command, false);
  EXECUTE 'SELECT string_agg(line, E''\n'' ORDER BY n) FROM pg_temp.wirefault_reply'
    INTO reply;
  reply := coalesce(reply, '');
  IF reply = '' OR command ~ '^\s*recorder\s*\.\s*dump\s*\(\s*\)\s*;?\s*$' THEN
    RETURN reply;
  END IF;
  -- These answer with key=value lines; an error line ("column N: ...", "internal error:
  -- ...") never starts with a key and an equals sign.
  IF command ~ '^\s*(faults\s*\.\s*list|proxy\s*\.\s*status)\s*\(\s*\)\s*;?\s*$'
      AND reply ~ '^[a-z_]+=' THEN
    RETURN reply;
  END IF;
  RAISE EXCEPTION 'wirefault: %', reply
    USING ERRCODE = 'invalid_parameter_value', DETAIL = 'command: ' || command;
END;
$$;

CREATE OR REPLACE FUNCTION wirefault.clear_traffic() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM wirefault.command('recorder.reset()');
END;
$$;

CREATE OR REPLACE FUNCTION wirefault.traffic()
RETURNS TABLE(conn int, source text, message text)
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM wirefault._exchange('recorder.dump()', true);
  RETURN QUERY EXECUTE
    'SELECT t.conn, t.source, t.message FROM pg_temp.wirefault_traffic t ORDER BY t.n';
END;
$$;

-- Named faults (several in force at once). A fault's name is checked here, before anything
-- is sent, so it goes into the command in double quotes without any escaping.
CREATE OR REPLACE FUNCTION wirefault._fault_name(name text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  IF name IS NULL OR name !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$' THEN
    RAISE EXCEPTION 'wirefault: bad fault name %: a letter or digit, then up to 63 letters, '
      'digits, ''_'', ''.'', '':'' or ''-''', coalesce(quote_literal(name), 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN '"' || name || '"';
END;
$$;

-- faults.add(name) followed by chain: 'onQuery().kill()', '.onQuery().kill()' or
-- 'conn.onQuery().kill()' alike. Replaces a fault of that name.
CREATE OR REPLACE FUNCTION wirefault.add_fault(name text, chain text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  quoted text := wirefault._fault_name(name);
  body text := regexp_replace(coalesce(chain, ''), '^\s*conn\s*(?=\.)', '');
BEGIN
  body := regexp_replace(body, '^\s+|\s+$', '', 'g');
  IF body = '' THEN
    RAISE EXCEPTION 'wirefault: a fault needs its steps and action, e.g. onQuery().kill()'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF body ~ '^faults\s*\.' THEN
    RAISE EXCEPTION 'wirefault: give the steps and action of the fault, without faults.*: %',
      quote_literal(body) USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF left(body, 1) <> '.' THEN
    body := '.' || body;
  END IF;
  PERFORM wirefault.command('faults.add(' || quoted || ')' || body);
END;
$$;

-- Raises 22023 with the proxy's message when there is no fault of that name.
CREATE OR REPLACE FUNCTION wirefault.remove_fault(name text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM wirefault.command('faults.remove(' || wirefault._fault_name(name) || ')');
END;
$$;

CREATE OR REPLACE FUNCTION wirefault.clear_faults() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM wirefault.command('faults.clear()');
END;
$$;

-- faults.list(), one row per fault in the order they were added. Each reply line is
-- space-separated key=value with command= last (its value runs to the end of the line);
-- keys this function does not know are skipped, so a newer proxy may say more.
CREATE OR REPLACE FUNCTION wirefault.faults()
RETURNS TABLE(name text, matched bigint, fired bigint, added timestamptz, state text,
              command text)
LANGUAGE plpgsql AS $$
DECLARE
  reply text := wirefault.command('faults.list()');
  line text;
  split int;
  fields jsonb;
BEGIN
  FOR line IN SELECT t.l FROM regexp_split_to_table(reply, E'\n') WITH ORDINALITY AS t(l, n)
              WHERE t.l <> '' ORDER BY t.n LOOP
    split := strpos(line, ' command=');
    fields := NULL;
    IF split > 0 THEN
      SELECT jsonb_object_agg(split_part(f.item, '=', 1),
                              substr(f.item, strpos(f.item, '=') + 1))
        INTO fields
        FROM regexp_split_to_table(left(line, split - 1), ' +') AS f(item)
       WHERE f.item LIKE '%=%';
    END IF;
    IF fields IS NULL OR NOT fields ?& ARRAY['name', 'matched', 'fired', 'added', 'state']
        OR fields->>'matched' !~ '^[0-9]+$' OR fields->>'fired' !~ '^[0-9]+$'
        OR fields->>'added' !~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z$' THEN
      RAISE EXCEPTION 'wirefault: unexpected line in the reply to faults.list(): %',
        quote_literal(line) USING ERRCODE = 'protocol_violation';
    END IF;
    name := fields->>'name';
    matched := (fields->>'matched')::bigint;
    fired := (fields->>'fired')::bigint;
    added := (fields->>'added')::timestamptz;
    state := fields->>'state';
    command := substr(line, split + length(' command='));
    RETURN NEXT;
  END LOOP;
END;
$$;
