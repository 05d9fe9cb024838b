-- 0005_status_writeback: the status write-back leaves the claim, and attach() refuses setups
-- that would stop every claim.
--
-- Until now a statement trigger on listener.jobs updated the app's status column inside the
-- claim and inside every job state change. An app transaction holding a row lock on its own
-- row then stalled every claim of every table, and an app transaction that touched a row and
-- then changed its URL while the daemon claimed it deadlocked with the claim (the app's
-- transaction was the one cancelled). The rule now: the app's own writes never fail or wait
-- because of listener.
--
-- Job state changes only queue the job in listener.status_outbox (a listener-owned table, so
-- no app lock is ever involved). The daemon drains the outbox in short transactions of its own
-- (listener.write_back_status) that skip app rows locked by someone else and come back for
-- them later, under a lock_timeout shorter than deadlock_timeout: the column is eventually
-- right and never blocks. The column may lag the job by up to the daemon's write-back interval
-- (0.5 s by default), and a new row's column stays as inserted (NULL, or the column's
-- default) until the first write-back.

-- Jobs whose status changed and has not been written back yet, for tables attached with a
-- status column. Rows are deleted once written (or once their app row is gone).
CREATE TABLE listener.status_outbox (
    job_id bigint PRIMARY KEY REFERENCES listener.jobs (id) ON DELETE CASCADE
);

DROP TRIGGER IF EXISTS jobs_write_back_insert ON listener.jobs;
DROP TRIGGER IF EXISTS jobs_write_back_update ON listener.jobs;
DROP FUNCTION listener.write_back_status();

-- Queues the jobs a statement inserted or whose status it changed. ON CONFLICT DO UPDATE, not
-- DO NOTHING: when a writer holds the job's outbox row (it is about to write the old status
-- and delete the row), DO NOTHING would see the row and return, and the change would be lost
-- with the delete; DO UPDATE waits for the writer's short transaction and inserts the row
-- again. Rows are taken in id order, so two statements queueing the same jobs cannot deadlock.
CREATE FUNCTION listener.queue_status_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO listener.status_outbox (job_id)
    SELECT n.id FROM new_jobs AS n
    WHERE n.source_table IN (
        SELECT source_table FROM listener.attachments WHERE status_column IS NOT NULL)
    ORDER BY n.id
    ON CONFLICT (job_id) DO UPDATE SET job_id = EXCLUDED.job_id;
    RETURN NULL;
END;
$$;

-- As above for updates, but only jobs whose status changed: lease renewals (every few seconds
-- for every running job) queue nothing.
CREATE FUNCTION listener.queue_status_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO listener.status_outbox (job_id)
    SELECT n.id FROM new_jobs AS n JOIN old_jobs AS o ON o.id = n.id
    WHERE n.status IS DISTINCT FROM o.status
      AND n.source_table IN (
          SELECT source_table FROM listener.attachments WHERE status_column IS NOT NULL)
    ORDER BY n.id
    ON CONFLICT (job_id) DO UPDATE SET job_id = EXCLUDED.job_id;
    RETURN NULL;
END;
$$;

-- The outbox triggers exist only while some attached table has a status column: a statement
-- trigger with transition tables costs every insert and claim, and most deployments do not
-- need it. attach() and detach() call this to add or drop them.
CREATE OR REPLACE FUNCTION listener.sync_write_back_triggers() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    wanted boolean := EXISTS (
        SELECT 1 FROM listener.attachments WHERE status_column IS NOT NULL);
    present boolean := EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgrelid = 'listener.jobs'::regclass AND tgname = 'jobs_status_outbox_insert');
BEGIN
    IF wanted AND NOT present THEN
        CREATE TRIGGER jobs_status_outbox_insert
            AFTER INSERT ON listener.jobs
            REFERENCING NEW TABLE AS new_jobs
            FOR EACH STATEMENT EXECUTE FUNCTION listener.queue_status_inserted();
        CREATE TRIGGER jobs_status_outbox_update
            AFTER UPDATE ON listener.jobs
            REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
            FOR EACH STATEMENT EXECUTE FUNCTION listener.queue_status_updated();
    ELSIF present AND NOT wanted THEN
        DROP TRIGGER jobs_status_outbox_insert ON listener.jobs;
        DROP TRIGGER jobs_status_outbox_update ON listener.jobs;
    END IF;
END;
$$;

-- write_back_status(limit, after): writes the current status of up to `limit` queued jobs
-- (job ids above `after`, in id order) into their app rows' status columns, in the caller's
-- transaction; run it in a short one of its own with a lock_timeout (the daemon does).
--   * Outbox rows are taken FOR UPDATE SKIP LOCKED: daemons share the work.
--   * App rows are locked FOR UPDATE SKIP LOCKED: a row the app holds is left queued for the
--     next round, never waited for. The writer holds no app row while waiting for anything,
--     so it cannot be part of a deadlock; a user trigger on the app table that waits is cut
--     short by the caller's lock_timeout, which fails the writer, not the app.
--   * Only differing values are written, so an app row already right is not rewritten.
--   * One table's failure (a column altered to a type that cannot hold the statuses, say)
--     leaves its rows queued and is reported in `errors`; the other tables go on.
-- Returns: rows taken, app rows written, rows left queued, the last job id taken (the next
-- call's `after`; NULL when none was taken), and one 'table: message' per failed table.
CREATE FUNCTION listener.write_back_status(
    p_limit integer, p_after bigint DEFAULT 0,
    OUT picked integer, OUT written integer, OUT deferred integer, OUT last_job_id bigint,
    OUT errors text[]
)
LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
    handled bigint[];
    done bigint[];
    n integer;
    a listener.attachments;
BEGIN
    written := 0;
    errors := '{}';
    SELECT coalesce(array_agg(o.job_id ORDER BY o.job_id), '{}') INTO ids
    FROM (
        SELECT job_id FROM listener.status_outbox
        WHERE job_id > coalesce(p_after, 0)
        ORDER BY job_id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ) AS o;
    picked := cardinality(ids);
    last_job_id := ids[picked];
    IF picked = 0 THEN
        deferred := 0;
        RETURN;
    END IF;

    -- Jobs of tables no longer attached with a status column: nothing to write.
    SELECT coalesce(array_agg(j.id), '{}') INTO handled
    FROM listener.jobs AS j
    WHERE j.id = ANY(ids) AND NOT EXISTS (
        SELECT 1 FROM listener.attachments AS x
        WHERE x.source_table = j.source_table AND x.status_column IS NOT NULL);

    FOR a IN
        SELECT * FROM listener.attachments
        WHERE status_column IS NOT NULL
          AND source_table IN (SELECT j.source_table FROM listener.jobs AS j WHERE j.id = ANY(ids))
        ORDER BY source_table
    LOOP
        BEGIN
            -- locked: the app rows this statement could lock (the others are held by someone
            -- else and stay queued). Handled: those, and jobs whose app row no longer exists.
            EXECUTE format($q$
                WITH mine AS (
                    SELECT j.id, j.source_id, j.status FROM listener.jobs AS j
                    WHERE j.id = ANY($1) AND j.source_table = %1$L
                ), locked AS (
                    SELECT m.id, m.source_id, m.status
                    FROM %2$s AS t JOIN mine AS m ON t.%3$I = m.source_id::%4$s
                    FOR UPDATE OF t SKIP LOCKED
                ), changed AS (
                    UPDATE %2$s AS t SET %5$I = l.status
                    FROM locked AS l
                    WHERE t.%3$I = l.source_id::%4$s AND t.%5$I IS DISTINCT FROM l.status
                    RETURNING 1
                )
                SELECT (SELECT count(*) FROM changed)::int,
                       array(SELECT l.id FROM locked AS l)
                       || array(SELECT m.id FROM mine AS m WHERE NOT EXISTS (
                              SELECT 1 FROM %2$s AS t WHERE t.%3$I = m.source_id::%4$s))
            $q$, a.source_table, a.source_table, a.id_column, a.id_type, a.status_column)
            INTO n, done USING ids;
            written := written + n;
            handled := handled || done;
        EXCEPTION WHEN OTHERS THEN
            errors := errors || format('%s: %s', a.source_table, SQLERRM);
        END;
    END LOOP;

    DELETE FROM listener.status_outbox WHERE job_id = ANY(handled);
    deferred := picked - cardinality(handled);
END;
$$;

-- attach(): as in 0001_init, and it refuses two setups that stopped everything:
--   * a table of the listener schema (attaching listener.jobs made every insert into every
--     attached table recurse until `stack depth limit exceeded`);
--   * a status column that cannot hold the statuses (varchar(8), integer...: every claim
--     failed), or that is also the id, URL or owner column, or a generated column.
CREATE OR REPLACE FUNCTION listener.attach(
    p_table text, p_id_column text, p_url_column text,
    p_owner_column text DEFAULT NULL, p_status_column text DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    rel regclass;
    qualified text;
    schema_name name;
    id_type text;
    col text;
    owner_expr text;
    suffix text;
    insert_fn text;
    update_fn text;
    st record;
BEGIN
    rel := to_regclass(p_table);
    IF rel IS NULL THEN
        RAISE EXCEPTION 'table % does not exist', p_table
            USING ERRCODE = 'undefined_table',
                  HINT = 'Give the table as schema.table; quote mixed-case names: ''"MyTable"''.';
    END IF;
    SELECT format('%I.%I', n.nspname, c.relname), n.nspname INTO qualified, schema_name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = rel AND c.relkind IN ('r', 'p');
    IF qualified IS NULL THEN
        RAISE EXCEPTION '% is not a table', p_table USING ERRCODE = 'wrong_object_type';
    END IF;
    IF schema_name = 'listener' THEN
        RAISE EXCEPTION '% is one of listener''s own tables: attach the table your app inserts '
                        'image rows into', qualified
            USING ERRCODE = 'invalid_parameter_value';
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

    IF p_status_column IS NOT NULL THEN
        IF p_status_column = p_id_column OR p_status_column = p_url_column
           OR p_status_column = p_owner_column THEN
            RAISE EXCEPTION 'status column % of % is also its % column', quote_ident(p_status_column),
                qualified,
                CASE p_status_column WHEN p_id_column THEN 'id' WHEN p_url_column THEN 'url'
                     ELSE 'owner' END
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Give a column of its own, e.g. ALTER TABLE ... ADD COLUMN '
                             'analysis_status text.';
        END IF;
        SELECT t.typname, a.atttypid, a.atttypmod, a.attgenerated,
               format_type(a.atttypid, a.atttypmod) AS shown
        INTO st
        FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = rel AND a.attname = p_status_column;
        IF st.attgenerated <> '' THEN
            RAISE EXCEPTION 'status column % of % is a generated column: listener cannot write it',
                quote_ident(p_status_column), qualified
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- 10 characters: 'processing' and 'cancelled' are the longest statuses.
        IF st.atttypid = 'varchar'::regtype AND st.atttypmod <> -1 AND st.atttypmod - 4 < 10 THEN
            RAISE EXCEPTION 'status column % of % holds at most % characters; listener writes '
                            'statuses of up to 10 (processing)',
                quote_ident(p_status_column), qualified, st.atttypmod - 4
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Use text, or varchar(10) or longer.';
        ELSIF st.atttypid = 'bpchar'::regtype THEN
            RAISE EXCEPTION 'status column % of % is %, which pads statuses with spaces',
                quote_ident(p_status_column), qualified, st.shown
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Use text, or varchar(10) or longer.';
        ELSIF st.atttypid NOT IN ('text'::regtype, 'varchar'::regtype) AND st.typname <> 'citext'
        THEN
            RAISE EXCEPTION 'status column % of % is %; listener writes text (pending, '
                            'processing, complete, failed, cancelled, batched)',
                quote_ident(p_status_column), qualified, st.shown
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Use text, varchar(10) or longer, or citext.';
        END IF;
    END IF;

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
        CREATE FUNCTION listener.%I() RETURNS trigger LANGUAGE plpgsql
            SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS %L
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
        CREATE FUNCTION listener.%I() RETURNS trigger LANGUAGE plpgsql
            SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS %L
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

-- An attachment of one of listener's own tables cannot have worked (every insert into an
-- attached table failed): remove it.
SELECT listener.detach(source_table) FROM listener.attachments
WHERE source_table LIKE 'listener.%';

SELECT listener.sync_write_back_triggers();
