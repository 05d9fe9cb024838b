-- 0017_cheaper_enqueue: the insert trigger of an attached table counts the jobs it enqueues.
--
-- Since 0008 every statement that inserts jobs fired jobs_count_insert, a statement trigger
-- with a transition table whose function appended the statement's count to
-- listener.job_count_deltas. For an app's single-row INSERT into an attached table that was a
-- second trigger call nested in the enqueue trigger: a SECURITY DEFINER function entry, a
-- transition table, and an INSERT ... SELECT ... GROUP BY planned and run on its own, about a
-- quarter of the trigger's cost. Now:
--   * the enqueue function attach generates inserts the jobs and appends their count in one
--     statement (a data-modifying CTE), with one delta row per owner as before;
--   * it runs with listener.enqueue_counts = 'on' (a SET clause of the function, like its
--     search_path: in force only while it runs), and jobs_count_insert fires only when that
--     setting is off or the insert is not made by a trigger (pg_trigger_depth() = 0), so a
--     session that sets it by hand still has its own inserts counted;
--   * every other insert of jobs (backfill, re-analysis, the URL-change trigger's upsert,
--     direct SQL) is counted by jobs_count_insert as before.
-- The counters stay exact: a job and its delta are written by the same statement. One NOTIFY
-- per statement and the jobs' durability are unchanged. Migrate's reattach_all() regenerates
-- the functions of tables attached before this migration.

DROP TRIGGER jobs_count_insert ON listener.jobs;
CREATE TRIGGER jobs_count_insert
    AFTER INSERT ON listener.jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT
    WHEN (pg_trigger_depth() = 0
          OR current_setting('listener.enqueue_counts', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION listener.count_inserted_jobs();

-- attach(table, id, url, owner, status): as in 0005, with the enqueue function above.
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

    -- One statement enqueues the jobs and counts them: the INSERT ... SELECT of the jobs, and
    -- from its RETURNING one aggregate row per owner appended to listener.job_count_deltas
    -- (0008), so the counters need no trigger call of their own for this path. The function's
    -- setting listener.enqueue_counts, in force only while it runs, tells jobs_count_insert
    -- to leave these jobs alone. Then at most one NOTIFY per statement, however many rows it
    -- inserted: NOTIFY takes a cluster-wide lock at commit, so per-row NOTIFY does not scale.
    -- A table without an owner column counts with a plain aggregate (no grouping to set up).
    EXECUTE format($f$
        CREATE FUNCTION listener.%I() RETURNS trigger LANGUAGE plpgsql
            SECURITY DEFINER SET search_path = pg_catalog, pg_temp
            SET listener.enqueue_counts = 'on' AS %L
    $f$, insert_fn, format($body$
        BEGIN
            WITH enqueued AS (
                INSERT INTO listener.jobs (source_table, source_id, image_url, owner_id, status)
                SELECT %1$L, n.%2$I::text, n.%3$I::text, %4$s, 'pending' FROM new_rows AS n
                ON CONFLICT (source_table, source_id) DO NOTHING
                RETURNING owner_id
            )
            INSERT INTO listener.job_count_deltas (source_table, owner_id, status, delta)
            SELECT %1$L, %5$s, 'pending', count(*) FROM enqueued AS e
            %6$s;
            IF FOUND THEN
                PERFORM pg_notify('listener_jobs', '');
            END IF;
            RETURN NULL;
        END;
    $body$, qualified, p_id_column, p_url_column, owner_expr,
        CASE WHEN p_owner_column IS NULL THEN 'NULL' ELSE 'e.owner_id' END,
        CASE WHEN p_owner_column IS NULL THEN 'HAVING count(*) > 0'
             ELSE 'GROUP BY e.owner_id' END));

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

