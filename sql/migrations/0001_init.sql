-- 0001_init: the job queue, results, attachments to users' tables, and their triggers.
--
-- Conventions:
--   * priority: lower runs first (0 = fresh uploads, 100 = backfill), as in graphile-worker.
--   * a job row is unique per (source_table, source_id): a source row is enqueued once. Both
--     are identifiers, compared bytewise (COLLATE "C"), which keeps the unique index cheap on
--     databases whose default collation is a linguistic one.
--   * every index here is paid for by every insert into an attached table, so there are only
--     the ones the claim, the lease reaper and the uniqueness need; per-table counts use the
--     unique index's leading column.
--   * lease_token fences a claim: completions, retries and heartbeats only touch a job whose
--     token still matches, so a worker whose lease expired can never overwrite a newer run.

CREATE SCHEMA IF NOT EXISTS listener;

CREATE TABLE listener.jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_table     text        COLLATE "C" NOT NULL,
    source_id        text        COLLATE "C" NOT NULL,
    image_url        text,
    owner_id         text,
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'processing', 'complete', 'failed')),
    priority         integer     NOT NULL DEFAULT 0,
    attempts         integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    run_after        timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz,
    lease_token      uuid,
    worker_id        text,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    CONSTRAINT jobs_source_key UNIQUE (source_table, source_id)
);

-- The claim reads pending jobs in (priority, run_after) order: an index scan over this partial
-- index, which holds only pending rows, so it stays small however many jobs are complete.
CREATE INDEX jobs_claim_idx ON listener.jobs (priority, run_after, id) WHERE status = 'pending';
-- The reaper looks for processing jobs whose lease expired.
CREATE INDEX jobs_lease_idx ON listener.jobs (lease_expires_at) WHERE status = 'processing';
CREATE INDEX jobs_finished_idx ON listener.jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE listener.results (
    job_id      bigint      NOT NULL REFERENCES listener.jobs (id) ON DELETE CASCADE,
    step        text        NOT NULL,
    provider    text        NOT NULL,
    output      jsonb       NOT NULL,
    model       text,
    duration_ms double precision,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, step)
);

-- One row per table listener is attached to. Column names are stored raw and quoted with
-- format('%I') wherever they are used.
CREATE TABLE listener.attachments (
    source_table  text        PRIMARY KEY,
    table_oid     oid         NOT NULL UNIQUE,
    id_column     text        NOT NULL,
    id_type       text        NOT NULL,
    url_column    text        NOT NULL,
    owner_column  text,
    status_column text,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Writes each job's status back to the source row's status column, for tables attached with
-- one. Statement-level with a transition table, so a claim of 100 jobs is one UPDATE per
-- attached table, not 100.
CREATE FUNCTION listener.write_back_status() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    a listener.attachments;
BEGIN
    FOR a IN
        SELECT * FROM listener.attachments
        WHERE status_column IS NOT NULL
          AND source_table IN (SELECT DISTINCT source_table FROM changed_jobs)
    LOOP
        EXECUTE format(
            'UPDATE %s AS t SET %I = c.status FROM changed_jobs AS c '
            'WHERE c.source_table = %L AND t.%I = c.source_id::%s '
            'AND t.%I IS DISTINCT FROM c.status',
            a.source_table, a.status_column, a.source_table, a.id_column, a.id_type,
            a.status_column);
    END LOOP;
    RETURN NULL;
END;
$$;

-- The write-back triggers exist only while some attached table has a status column: a
-- statement trigger with a transition table costs every insert and claim, and most
-- deployments do not need it. attach() and detach() call this to add or drop them.
CREATE FUNCTION listener.sync_write_back_triggers() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    wanted boolean := EXISTS (
        SELECT 1 FROM listener.attachments WHERE status_column IS NOT NULL);
    present boolean := EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgrelid = 'listener.jobs'::regclass AND tgname = 'jobs_write_back_insert');
BEGIN
    IF wanted AND NOT present THEN
        CREATE TRIGGER jobs_write_back_insert
            AFTER INSERT ON listener.jobs
            REFERENCING NEW TABLE AS changed_jobs
            FOR EACH STATEMENT EXECUTE FUNCTION listener.write_back_status();
        CREATE TRIGGER jobs_write_back_update
            AFTER UPDATE ON listener.jobs
            REFERENCING NEW TABLE AS changed_jobs
            FOR EACH STATEMENT EXECUTE FUNCTION listener.write_back_status();
    ELSIF present AND NOT wanted THEN
        DROP TRIGGER jobs_write_back_insert ON listener.jobs;
        DROP TRIGGER jobs_write_back_update ON listener.jobs;
    END IF;
END;
$$;

-- attach(table, id_column, url_column, owner_column, status_column): installs the enqueue
-- triggers on a user's table. The table name is parsed like any SQL name (to_regclass), so
-- mixed-case or odd names are passed quoted: '"My Table"'. Column names are passed raw.
-- The generated trigger functions have the quoted names baked in, so their plans are cached.
CREATE FUNCTION listener.attach(
    p_table text, p_id_column text, p_url_column text,
    p_owner_column text DEFAULT NULL, p_status_column text DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    rel regclass;
    qualified text;
    id_type text;
    col text;
    owner_expr text;
    suffix text;
    insert_fn text;
    update_fn text;
BEGIN
    rel := to_regclass(p_table);
    IF rel IS NULL THEN
        RAISE EXCEPTION 'table % does not exist', p_table
            USING ERRCODE = 'undefined_table',
                  HINT = 'Give the table as schema.table; quote mixed-case names: ''"MyTable"''.';
    END IF;
    SELECT format('%I.%I', n.nspname, c.relname) INTO qualified
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = rel AND c.relkind IN ('r', 'p');
    IF qualified IS NULL THEN
        RAISE EXCEPTION '% is not a table', p_table USING ERRCODE = 'wrong_object_type';
    END IF;

    FOREACH col IN ARRAY ARRAY[p_id_column, p_url_column, p_owner_column, p_status_column] LOOP
        IF col IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM pg_attribute
            WHERE attrelid = rel AND attname = col AND attnum > 0 AND NOT attisdropped
        ) THEN
            RAISE EXCEPTION 'column % does not exist in table %', quote_ident(col), qualified
                USING ERRCODE = 'undefined_column';
        END IF;
    END LOOP;

    SELECT format_type(atttypid, atttypmod) INTO id_type
    FROM pg_attribute WHERE attrelid = rel AND attname = p_id_column;

    owner_expr := CASE WHEN p_owner_column IS NULL THEN 'NULL'
                       ELSE format('n.%I::text', p_owner_column) END;
    suffix := rel::oid::text;
    insert_fn := 'enqueue_insert_' || suffix;
    update_fn := 'enqueue_update_' || suffix;

    -- Re-attaching replaces the previous triggers and settings.
    PERFORM listener.detach(qualified);

    -- One INSERT ... SELECT and at most one NOTIFY per statement, however many rows it
    -- inserted: NOTIFY takes a cluster-wide lock at commit, so per-row NOTIFY does not scale.
    EXECUTE format($f$
        CREATE FUNCTION listener.%I() RETURNS trigger LANGUAGE plpgsql AS %L
    $f$, insert_fn, format($body$
        BEGIN
            INSERT INTO listener.jobs (source_table, source_id, image_url, owner_id)
            SELECT %L, n.%I::text, n.%I::text, %s FROM new_rows AS n
            ON CONFLICT (source_table, source_id) DO NOTHING;
            IF FOUND THEN
                PERFORM pg_notify('listener_jobs', '');
            END IF;
            RETURN NULL;
        END;
    $body$, qualified, p_id_column, p_url_column, owner_expr));

    -- A changed URL means a new image: the row's job starts over. Row-level with a WHEN
    -- clause (transition tables cannot be combined with UPDATE OF), so updates that leave the
    -- URL alone, such as the status write-back, never even call the function; pg_notify
    -- folds identical notifications of one transaction into one.
    EXECUTE format($f$
        CREATE FUNCTION listener.%I() RETURNS trigger LANGUAGE plpgsql AS %L
    $f$, update_fn, format($body$
        BEGIN
            INSERT INTO listener.jobs (source_table, source_id, image_url, owner_id)
            VALUES (%L, NEW.%I::text, NEW.%I::text, %s)
            ON CONFLICT (source_table, source_id) DO UPDATE
            SET image_url = EXCLUDED.image_url, owner_id = EXCLUDED.owner_id,
                status = 'pending', attempts = 0, run_after = now(), last_error = NULL,
                lease_expires_at = NULL, lease_token = NULL, worker_id = NULL,
                started_at = NULL, finished_at = NULL, updated_at = now();
            PERFORM pg_notify('listener_jobs', '');
            RETURN NULL;
        END;
    $body$, qualified, p_id_column, p_url_column,
        CASE WHEN p_owner_column IS NULL THEN 'NULL'
             ELSE format('NEW.%I::text', p_owner_column) END));

    EXECUTE format(
        'CREATE TRIGGER listener_enqueue_insert AFTER INSERT ON %s '
        'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION listener.%I()',
        qualified, insert_fn);
    EXECUTE format(
        'CREATE TRIGGER listener_enqueue_update AFTER UPDATE OF %I ON %s FOR EACH ROW '
        'WHEN (OLD.%I IS DISTINCT FROM NEW.%I) EXECUTE FUNCTION listener.%I()',
        p_url_column, qualified, p_url_column, p_url_column, update_fn);

    INSERT INTO listener.attachments
        (source_table, table_oid, id_column, id_type, url_column, owner_column, status_column)
    VALUES (qualified, rel, p_id_column, id_type, p_url_column, p_owner_column, p_status_column);
    PERFORM listener.sync_write_back_triggers();
    RETURN qualified;
END;
$$;

-- detach(table): removes the triggers and trigger functions attach() installed. Jobs and
-- results stay. Returns false when the table was not attached.
CREATE FUNCTION listener.detach(p_table text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    a listener.attachments;
    rel regclass;
BEGIN
    rel := to_regclass(p_table);
    SELECT * INTO a FROM listener.attachments
    WHERE source_table = p_table OR (rel IS NOT NULL AND table_oid = rel::oid);
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF to_regclass(a.source_table) IS NOT NULL THEN
        EXECUTE format('DROP TRIGGER IF EXISTS listener_enqueue_insert ON %s', a.source_table);
        EXECUTE format('DROP TRIGGER IF EXISTS listener_enqueue_update ON %s', a.source_table);
    END IF;
    EXECUTE format('DROP FUNCTION IF EXISTS listener.%I()', 'enqueue_insert_' || a.table_oid);
    EXECUTE format('DROP FUNCTION IF EXISTS listener.%I()', 'enqueue_update_' || a.table_oid);
    DELETE FROM listener.attachments WHERE source_table = a.source_table;
    PERFORM listener.sync_write_back_triggers();
    RETURN true;
END;
$$;

-- attachment(table): the attachment row of a table, or an error naming the fix.
CREATE FUNCTION listener.attachment(p_table text) RETURNS listener.attachments
LANGUAGE plpgsql STABLE AS $$
DECLARE
    a listener.attachments;
    rel regclass;
BEGIN
    rel := to_regclass(p_table);
    SELECT * INTO a FROM listener.attachments
    WHERE source_table = p_table OR (rel IS NOT NULL AND table_oid = rel::oid);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not attached', p_table
            USING ERRCODE = 'undefined_object',
                  HINT = 'Run: listener attach TABLE --id-column ID --url-column URL';
    END IF;
    RETURN a;
END;
$$;

-- count_unqueued(table, owner): rows of an attached table that have no job yet.
CREATE FUNCTION listener.count_unqueued(p_table text, p_owner text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    a listener.attachments := listener.attachment(p_table);
    n bigint;
BEGIN
    IF p_owner IS NOT NULL AND a.owner_column IS NULL THEN
        RAISE EXCEPTION 'table % was attached without --owner-column', a.source_table;
    END IF;
    EXECUTE format(
        'SELECT count(*) FROM %s AS s WHERE ($1 IS NULL OR s.%I::text = $1) '
        'AND NOT EXISTS (SELECT 1 FROM listener.jobs AS j '
        'WHERE j.source_table = %L AND j.source_id = s.%I::text)',
        a.source_table, coalesce(a.owner_column, a.id_column), a.source_table, a.id_column)
    INTO n USING p_owner;
    RETURN n;
END;
$$;

-- backfill_chunk(table, after, chunk, owner, priority, max_attempts): enqueues the rows that
-- have no job among the next `chunk` rows in id order after `after` (NULL: from the start).
-- Returns the last id scanned (NULL when the table is exhausted), rows scanned, jobs enqueued.
-- Keyset pagination keeps each chunk an index range scan on the id column.
CREATE FUNCTION listener.backfill_chunk(
    p_table text, p_after text, p_chunk integer, p_owner text, p_priority integer,
    p_max_attempts integer,
    OUT last_id text, OUT scanned integer, OUT enqueued integer
)
LANGUAGE plpgsql AS $$
DECLARE
    a listener.attachments := listener.attachment(p_table);
BEGIN
    IF p_owner IS NOT NULL AND a.owner_column IS NULL THEN
        RAISE EXCEPTION 'table % was attached without --owner-column', a.source_table;
    END IF;
    EXECUTE format($q$
        WITH chunk AS (
            SELECT s.%1$I AS id, s.%2$I::text AS url, %3$s AS owner
            FROM %4$s AS s
            WHERE ($1::text IS NULL OR s.%1$I > $1::%5$s)
              AND ($3::text IS NULL OR s.%6$I::text = $3)
            ORDER BY s.%1$I
            LIMIT $2
        ), ins AS (
            INSERT INTO listener.jobs
                (source_table, source_id, image_url, owner_id, priority, max_attempts)
            SELECT %7$L, c.id::text, c.url, c.owner, $4, $5 FROM chunk AS c
            ON CONFLICT (source_table, source_id) DO NOTHING
            RETURNING 1
        )
        SELECT (SELECT c.id::text FROM chunk AS c ORDER BY c.id DESC LIMIT 1),
               (SELECT count(*) FROM chunk)::int,
               (SELECT count(*) FROM ins)::int
    $q$,
        a.id_column, a.url_column,
        CASE WHEN a.owner_column IS NULL THEN 'NULL::text'
             ELSE format('s.%I::text', a.owner_column) END,
        a.source_table, a.id_type, coalesce(a.owner_column, a.id_column), a.source_table)
    INTO last_id, scanned, enqueued
    USING p_after, p_chunk, p_owner, p_priority, p_max_attempts;
    IF enqueued > 0 THEN
        PERFORM pg_notify('listener_jobs', '');
    END IF;
END;
$$;
