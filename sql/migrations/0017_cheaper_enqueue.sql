-- 0017_cheaper_enqueue: the insert trigger of an attached table counts the jobs it enqueues.
--
-- Since 0008 every statement that inserts jobs fired jobs_count_insert, a statement trigger
-- with a transition table whose function appended the statement's count to
-- listener.job_count_deltas. For an app's single-row INSERT into an attached table that was a
-- second trigger call nested in the enqueue trigger: a SECURITY DEFINER function entry, a
-- transition table, and an INSERT ... SELECT ... GROUP BY planned and run on its own, about a
-- quarter of the trigger's cost. Now:
--   * the enqueue function attach generates (since 0014 in attach_deletes) inserts the jobs
--     and appends their count in one statement (data-modifying CTEs), with one delta row per
--     owner as before; the same statement queues the rows whose key an older job still holds
--     (0014's reinserted rows), so the common insert no longer collects its keys;
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

-- attach_deletes(table): as in 0014, with the enqueue function above. It is what attach()
-- (both forms) ends with, so every attach, and migrate's reattach_all(), installs it.
CREATE OR REPLACE FUNCTION listener.attach_deletes(p_table text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    a listener.attachments := listener.attachment(p_table);
    owner_expr text;
BEGIN
    owner_expr := CASE WHEN a.owner_column IS NULL THEN 'NULL'
                       ELSE format('n.%I::text', a.owner_column) END;
    -- One statement enqueues the jobs, counts them and queues the reinserted rows, then at
    -- most one NOTIFY per statement, however many rows it inserted (NOTIFY takes a
    -- cluster-wide lock at commit: per-row NOTIFY does not scale):
    --   * enqueued: the INSERT ... SELECT of the jobs (ON CONFLICT DO NOTHING);
    --   * counted: from its RETURNING, one delta row per owner appended to
    --     listener.job_count_deltas (0008); the function's setting listener.enqueue_counts,
    --     in force only while it runs, tells jobs_count_insert to leave these jobs alone;
    --   * held: rows whose key a job already held. Every part of one statement reads the
    --     same snapshot, taken before the insert, so the jobs this statement creates are not
    --     seen here: a row that finds a job is one the insert skipped. The join runs only when
    --     fewer jobs were enqueued than rows inserted (a one-time filter): the common insert
    --     never probes listener.jobs for it.
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION listener.%I() RETURNS trigger LANGUAGE plpgsql
            SECURITY DEFINER SET search_path = pg_catalog, pg_temp
            SET listener.enqueue_counts = 'on' AS %L
    $f$, 'enqueue_insert_' || a.table_oid, format($body$
        DECLARE
            created bigint;
            held bigint;
        BEGIN
            WITH enqueued AS (
                INSERT INTO listener.jobs (source_table, source_id, image_url, owner_id, status)
                SELECT %1$L, n.%2$I::text, n.%3$I::text, %4$s, 'pending' FROM new_rows AS n
                ON CONFLICT (source_table, source_id) DO NOTHING
                RETURNING owner_id
            ), counted AS (
                INSERT INTO listener.job_count_deltas (source_table, owner_id, status, delta)
                SELECT %1$L, %5$s, 'pending', count(*) FROM enqueued AS e
                %6$s
                RETURNING delta
            ), reinserted AS (
                INSERT INTO listener.deleted_rows (source_table, source_id, job_id, reinserted)
                SELECT %1$L, n.%2$I::text, j.id, true
                FROM new_rows AS n
                JOIN listener.jobs AS j
                  ON j.source_table = %1$L AND j.source_id = n.%2$I::text COLLATE "C"
                WHERE (SELECT count(*) FROM enqueued) < (SELECT count(*) FROM new_rows)
                RETURNING 1
            )
            SELECT (SELECT coalesce(sum(delta), 0) FROM counted),
                   (SELECT count(*) FROM reinserted)
            INTO created, held;
            IF created > 0 OR held > 0 THEN
                PERFORM pg_notify('listener_jobs', '');
            END IF;
            RETURN NULL;
        END;
    $body$, a.source_table, a.id_column, a.url_column, owner_expr,
        CASE WHEN a.owner_column IS NULL THEN 'NULL' ELSE 'e.owner_id' END,
        CASE WHEN a.owner_column IS NULL THEN 'HAVING count(*) > 0'
             ELSE 'GROUP BY e.owner_id' END));

    -- As in 0014: only an append, no job row is read for update or locked, so the app's
    -- DELETE never waits for a daemon working on the row's job.
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
