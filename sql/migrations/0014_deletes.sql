-- 0014_deletes: a row the app deletes loses its job, its results and its faces.
--
-- The app's DELETE must never wait or fail because of listener, so the trigger attach()
-- now installs for deletes only appends to an outbox, listener.deleted_rows: one
-- statement-level AFTER DELETE trigger with a transition table, one INSERT ... SELECT and one
-- NOTIFY per statement. It reads the row's job id (a plain read: MVCC, no lock) and takes no
-- lock on any job row: the outbox has no foreign key to listener.jobs, whose check would take
-- a KEY SHARE lock on the job. A daemon drains the outbox (listener/deletes.py) in short
-- transactions of its own, at least once, each step idempotent:
--   1. claim due entries (FOR UPDATE SKIP LOCKED) and lease them (next_attempt_at moves on);
--   2. listener.forget_rows (through the job store): a job still running is cancelled (its
--      worker's fenced writes fail: no result lands on a deleted row) and the entry comes back
--      once the lease it had would have ended; any other job is cancelled and deleted with its
--      results; the row's faces whose job is gone are returned;
--   3. those faces are deleted from the owner's Rekognition collection (DeleteFaces), and for
--      a job that ever ran without completing, every face of the row's ExternalImageId too;
--   4. the faces' rows are deleted (suggestions cascade), then the entry.
--
-- A row re-inserted with the same id gets a fresh job. After the drain that is what the
-- insert trigger does anyway (the old job is gone). Before it, the old job still holds the
-- (source_table, source_id) key and the trigger's ON CONFLICT DO NOTHING keeps it: so the
-- insert trigger now also appends such rows to the outbox (reinserted = true), and their drain
-- forgets the old job and enqueues the row afresh from its current values. This also covers
-- rows deleted while no delete trigger existed (before 0014, or while detached).
--
-- TRUNCATE fires no delete trigger: rows truncated away keep their jobs (prune removes them).

CREATE TABLE listener.deleted_rows (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_table    text        COLLATE "C" NOT NULL,
    source_id       text        COLLATE "C" NOT NULL,
    -- The row's job when the row was deleted (NULL: it had none). No foreign key, see above;
    -- the drain forgets this job only, never a newer one of a row inserted again since.
    job_id          bigint,
    reinserted      boolean     NOT NULL DEFAULT false,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    deleted_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX deleted_rows_due_idx ON listener.deleted_rows (next_attempt_at, id);

-- detach(table): as in 0001, and the delete trigger and its function go too.
CREATE OR REPLACE FUNCTION listener.detach(p_table text) RETURNS boolean
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
        EXECUTE format('DROP TRIGGER IF EXISTS listener_forget_delete ON %s', a.source_table);
    END IF;
    EXECUTE format('DROP FUNCTION IF EXISTS listener.%I()', 'enqueue_insert_' || a.table_oid);
    EXECUTE format('DROP FUNCTION IF EXISTS listener.%I()', 'enqueue_update_' || a.table_oid);
    EXECUTE format('DROP FUNCTION IF EXISTS listener.%I()', 'forget_delete_' || a.table_oid);
    DELETE FROM listener.attachments WHERE source_table = a.source_table;
    PERFORM listener.sync_write_back_triggers();
    RETURN true;
END;
$$;

-- attach_deletes(table): the part of attach() this version adds, for a table whose
-- attachment is recorded: the insert trigger's function is generated again so that a row
-- inserted while an old job holds its key is queued as reinserted (the common insert pays
-- one count of its transition table more), and the delete trigger is installed.
CREATE FUNCTION listener.attach_deletes(p_table text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    a listener.attachments := listener.attachment(p_table);
    owner_expr text;
BEGIN
    owner_expr := CASE WHEN a.owner_column IS NULL THEN 'NULL'
                       ELSE format('n.%I::text', a.owner_column) END;
    -- Still one INSERT ... SELECT and at most one NOTIFY per statement. The keys it inserted
    -- are kept (RETURNING) only to find, when fewer rows got a job than were inserted, the
    -- rows whose key an older job holds: a hash anti-join, on that rare path only.
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION listener.%I() RETURNS trigger LANGUAGE plpgsql
            SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS %L
    $f$, 'enqueue_insert_' || a.table_oid, format($body$
        DECLARE
            created text[];
        BEGIN
            WITH ins AS (
                INSERT INTO listener.jobs (source_table, source_id, image_url, owner_id)
                SELECT %1$L, n.%2$I::text, n.%3$I::text, %4$s FROM new_rows AS n
                ON CONFLICT (source_table, source_id) DO NOTHING
                RETURNING source_id
            )
            SELECT coalesce(array_agg(ins.source_id), '{}') INTO created FROM ins;
            IF cardinality(created) > 0 THEN
                PERFORM pg_notify('listener_jobs', '');
            END IF;
            IF cardinality(created) < (SELECT count(*) FROM new_rows) THEN
                INSERT INTO listener.deleted_rows (source_table, source_id, job_id, reinserted)
                SELECT %1$L, k.key, j.id, true
                FROM (SELECT n.%2$I::text AS key FROM new_rows AS n
                      EXCEPT SELECT unnest(created)) AS k
                JOIN listener.jobs AS j
                  ON j.source_table = %1$L AND j.source_id = k.key COLLATE "C";
                IF FOUND THEN
                    PERFORM pg_notify('listener_jobs', '');
                END IF;
            END IF;
            RETURN NULL;
        END;
    $body$, a.source_table, a.id_column, a.url_column, owner_expr));

    -- Only an append: no job row is read for update or locked, so the app's DELETE never
    -- waits for a daemon working on the row's job.
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION listener.%I() RETURNS trigger LANGUAGE plpgsql
            SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS %L
    $f$, 'forget_delete_' || a.table_oid, format($body$
        BEGIN
            INSERT INTO listener.deleted_rows (source_table, source_id, job_id)
            SELECT %1$L, o.%2$I::text, j.id
            FROM old_rows AS o
            LEFT JOIN listener.jobs AS j
              ON j.source_table = %1$L AND j.source_id = o.%2$I::text COLLATE "C";
            IF FOUND THEN
                PERFORM pg_notify('listener_jobs', '');
            END IF;
            RETURN NULL;
        END;
    $body$, a.source_table, a.id_column));

    EXECUTE format('DROP TRIGGER IF EXISTS listener_forget_delete ON %s', a.source_table);
    EXECUTE format(
        'CREATE TRIGGER listener_forget_delete AFTER DELETE ON %s '
        'REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION listener.%I()',
        a.source_table, 'forget_delete_' || a.table_oid);
END;
$$;

-- The five-parameter attach of 0005 keeps its body under another name; attach() with five
-- and with eight parameters now both end with attach_deletes().
ALTER FUNCTION listener.attach(text, text, text, text, text) RENAME TO attach_triggers;

CREATE FUNCTION listener.attach(
    p_table text, p_id_column text, p_url_column text,
    p_owner_column text DEFAULT NULL, p_status_column text DEFAULT NULL
) RETURNS text
LANGUAGE sql AS $$
    SELECT listener.attach(p_table, p_id_column, p_url_column, p_owner_column,
                           p_status_column, NULL, NULL, NULL);
$$;

-- attach(table, id, url, owner, status, result, error, analyzed_at): as in 0011 (the
-- triggers, then the write-back columns, each checked), then attach_deletes().
CREATE OR REPLACE FUNCTION listener.attach(
    p_table text, p_id_column text, p_url_column text, p_owner_column text,
    p_status_column text, p_result_column text, p_error_column text,
    p_analyzed_at_column text
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    qualified text;
    rel regclass;
    role text;
    col text;
    other text;
    st record;
    others text[];
BEGIN
    qualified := listener.attach_triggers(
        p_table, p_id_column, p_url_column, p_owner_column, p_status_column);
    rel := qualified::regclass;
    others := ARRAY[p_id_column, p_url_column, p_owner_column, p_status_column];
    FOREACH role IN ARRAY ARRAY['result', 'error', 'analyzed-at'] LOOP
        col := CASE role WHEN 'result' THEN p_result_column
                         WHEN 'error' THEN p_error_column
                         ELSE p_analyzed_at_column END;
        IF col IS NULL THEN
            others := others || NULL::text;
            CONTINUE;
        END IF;
        SELECT t.typname, a.atttypid, a.atttypmod, a.attgenerated,
               format_type(a.atttypid, a.atttypmod) AS shown
        INTO st
        FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = rel AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'column % does not exist in table %', quote_ident(col), qualified
                USING ERRCODE = 'undefined_column';
        END IF;
        other := CASE col WHEN p_id_column THEN 'id' WHEN p_url_column THEN 'url'
                          WHEN p_owner_column THEN 'owner' WHEN p_status_column THEN 'status'
                          WHEN others[5] THEN 'result' WHEN others[6] THEN 'error' END;
        IF other IS NOT NULL THEN
            RAISE EXCEPTION '% column % of % is also its % column', role, quote_ident(col),
                qualified, other
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Give each write-back column a column of its own.';
        END IF;
        others := others || col;
        IF st.attgenerated <> '' THEN
            RAISE EXCEPTION '% column % of % is a generated column: listener cannot write it',
                role, quote_ident(col), qualified
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF role = 'result' AND st.atttypid <> 'jsonb'::regtype THEN
            RAISE EXCEPTION 'result column % of % is %; listener writes jsonb (step outputs '
                            'keyed by step)', quote_ident(col), qualified, st.shown
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = format('Use jsonb: ALTER TABLE %s ALTER COLUMN %I TYPE jsonb '
                                    'USING %I::jsonb', qualified, col, col);
        ELSIF role = 'error' THEN
            IF st.atttypid = 'varchar'::regtype AND st.atttypmod <> -1
               AND st.atttypmod - 4 < 200 THEN
                RAISE EXCEPTION 'error column % of % holds at most % characters; listener '
                                'needs 200 or more (longer errors are cut to fit)',
                    quote_ident(col), qualified, st.atttypmod - 4
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Use text, or varchar(200) or longer.';
            ELSIF st.atttypid NOT IN ('text'::regtype, 'varchar'::regtype)
                  AND st.typname <> 'citext' THEN
                RAISE EXCEPTION 'error column % of % is %; listener writes text (the last '
                                'error message)', quote_ident(col), qualified, st.shown
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Use text, varchar(200) or longer, or citext.';
            END IF;
        ELSIF role = 'analyzed-at'
              AND st.atttypid NOT IN ('timestamptz'::regtype, 'timestamp'::regtype) THEN
            RAISE EXCEPTION 'analyzed-at column % of % is %; listener writes a timestamp (when '
                            'the analysis completed)', quote_ident(col), qualified, st.shown
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Use timestamptz (or timestamp).';
        END IF;
    END LOOP;

    UPDATE listener.attachments
    SET result_column = p_result_column, error_column = p_error_column,
        analyzed_at_column = p_analyzed_at_column
    WHERE source_table = qualified;
    PERFORM listener.sync_write_back_triggers();
    PERFORM listener.attach_deletes(qualified);
    RETURN qualified;
END;
$$;

-- forget_rows(tables, ids, jobs, reinserted): the job store's half of draining deleted rows
-- (PgJobStore.forget_rows), in the caller's transaction. Entry i names row (tables[i],
-- ids[i]), its job when it was deleted (jobs[i], NULL: none), and whether it was inserted
-- again while that job held its key (reinserted[i]). For each entry, in order:
--   * the job is still running (processing, lease not expired): it is cancelled (lease token
--     cleared: its worker's fenced writes fail from now on), and `running_s` says how many
--     seconds its lease had left: faces it may still index are swept once that has passed;
--   * otherwise the job, if it still exists, is cancelled if unfinished (a terminal event)
--     and deleted with its results (faces keep their rows, with job_id NULL, until their
--     deletion from the collection is confirmed: forget_faces); `sweep` is true when it had
--     been claimed without completing (a run may have indexed faces it never recorded), with
--     its owner in `owner_id`; a reinserted row then gets a fresh job from its current values
--     in its attached table (`restarted`: the new job; NULL when the row is gone or the table
--     is no longer attached);
--   * `faces`: the row's recorded faces whose job is gone, as {"collection_id", "face_id"}.
-- Job rows are locked in id order (FOR UPDATE), so concurrent drains cannot deadlock.
CREATE FUNCTION listener.forget_rows(
    p_tables text[], p_ids text[], p_jobs bigint[], p_reinserted boolean[]
) RETURNS TABLE (
    ord integer, running_s double precision, sweep boolean, owner_id text,
    restarted bigint, faces jsonb
)
LANGUAGE plpgsql AS $$
DECLARE
    i integer;
    j listener.jobs;
    a listener.attachments;
BEGIN
    PERFORM 1 FROM listener.jobs AS x WHERE x.id = ANY(p_jobs) ORDER BY x.id FOR UPDATE;
    FOR i IN 1 .. coalesce(cardinality(p_tables), 0) LOOP
        ord := i;
        running_s := NULL;
        sweep := false;
        owner_id := NULL;
        restarted := NULL;
        j := NULL;
        IF p_jobs[i] IS NOT NULL THEN
            SELECT * INTO j FROM listener.jobs AS x
            WHERE x.id = p_jobs[i] AND x.source_table = p_tables[i] COLLATE "C"
              AND x.source_id = p_ids[i] COLLATE "C";
        END IF;
        IF j.id IS NOT NULL AND j.status = 'processing' AND j.lease_expires_at > now() THEN
            UPDATE listener.jobs AS x
            SET status = 'cancelled', finished_at = now(), updated_at = now(),
                last_error = 'source row deleted', lease_token = NULL, lease_expires_at = NULL
            WHERE x.id = j.id;
            running_s := extract(epoch FROM j.lease_expires_at - now());
            faces := '[]'::jsonb;
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF j.id IS NOT NULL THEN
            IF j.status IN ('pending', 'processing', 'batched') THEN
                UPDATE listener.jobs AS x
                SET status = 'cancelled', finished_at = now(), updated_at = now(),
                    last_error = 'source row deleted', lease_token = NULL,
                    lease_expires_at = NULL
                WHERE x.id = j.id;
            END IF;
            DELETE FROM listener.jobs AS x WHERE x.id = j.id;
            sweep := j.claims > 0 AND j.status <> 'complete';
            owner_id := j.owner_id;
        END IF;
        SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'collection_id', f.collection_id, 'face_id', f.face_id)
                   ORDER BY f.face_id), '[]'::jsonb)
        INTO faces
        FROM listener.faces AS f
        WHERE f.source_table = p_tables[i] AND f.source_id = p_ids[i] AND f.job_id IS NULL;
        IF p_reinserted[i] THEN
            SELECT * INTO a FROM listener.attachments AS x WHERE x.source_table = p_tables[i];
            IF FOUND THEN
                EXECUTE format($q$
                    INSERT INTO listener.jobs (source_table, source_id, image_url, owner_id)
                    SELECT %1$L, s.%2$I::text, s.%3$I::text, %4$s
                    FROM %1$s AS s WHERE s.%2$I = $1::%5$s
                    ON CONFLICT (source_table, source_id) DO NOTHING
                    RETURNING id
                $q$, a.source_table, a.id_column, a.url_column,
                    CASE WHEN a.owner_column IS NULL THEN 'NULL::text'
                         ELSE format('s.%I::text', a.owner_column) END,
                    a.id_type)
                INTO restarted USING p_ids[i];
                IF restarted IS NOT NULL THEN
                    PERFORM pg_notify('listener_jobs', '');
                END IF;
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- forget_faces(face_ids): the faces of deleted rows are gone from their collections: delete
-- their rows (suggestions about them cascade; suggestions naming them as the candidate go
-- too, and faces matched to them forget the match). Only faces whose job is gone: a face a
-- live job recorded is never deleted here. Returns the rows deleted.
CREATE FUNCTION listener.forget_faces(p_face_ids text[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    gone text[];
BEGIN
    WITH d AS (
        DELETE FROM listener.faces AS f
        WHERE f.face_id = ANY(p_face_ids) AND f.job_id IS NULL
        RETURNING f.face_id
    )
    SELECT coalesce(array_agg(d.face_id), '{}') INTO gone FROM d;
    IF cardinality(gone) > 0 THEN
        DELETE FROM listener.face_suggestions AS s WHERE s.candidate_face_id = ANY(gone);
        UPDATE listener.faces AS f SET matched_face = NULL, similarity = NULL
        WHERE f.matched_face = ANY(gone);
    END IF;
    RETURN cardinality(gone);
END;
$$;
