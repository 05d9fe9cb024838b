-- 0025_outbox_ages: operators see every queue, not only the jobs. /metrics, /status and
-- `listener status` report, for each outbox listener keeps in Postgres (the status
-- write-back's, the webhook events', the deleted rows', the inserted rows'), the rows waiting
-- and the age of the oldest (the outboxes query of sql/queries.sql). Two of them recorded no
-- time:
--
-- * listener.status_outbox.queued_at: when the oldest change of the job not written back yet
--   was queued. The triggers' ON CONFLICT ... DO UPDATE (a job queued again before it was
--   written) keeps the row, and so its time.
-- * listener.inserted_rows.inserted_at: when the app inserted the row. admit_entries() puts
--   back the entries of a table it cannot read (a column renamed since attach); it now keeps
--   their time, so the age of a table's entries that cannot be admitted grows instead of
--   starting over at every admission.
--
-- Neither column is indexed: writes to both tables stay one heap tuple and one primary-key
-- entry. Rows already queued when this runs count their age from the upgrade (the default is
-- evaluated once, as the column is added, without rewriting the table). Adding each column
-- takes its table's ACCESS EXCLUSIVE lock for the length of this migration's transaction:
-- app inserts into attached tables and job changes wait for it.

ALTER TABLE listener.status_outbox ADD COLUMN queued_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE listener.inserted_rows ADD COLUMN inserted_at timestamptz NOT NULL DEFAULT now();

-- admit_entries(): as before, but the entries it puts back keep their inserted_at.
CREATE OR REPLACE FUNCTION listener.admit_entries(
    p_limit integer, p_room integer, p_worker text, p_lease_s double precision, p_token uuid,
    p_max_attempts integer, OUT taken bigint, OUT admitted bigint, OUT claimed bigint[]
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_bitmapscan = off
SET jit = off AS $$
DECLARE
    ids bigint[];
    tables text[];
    keys text[];
    stamps timestamptz[];
    a record;
    r record;
BEGIN
    taken := 0;
    admitted := 0;
    claimed := '{}';
    WITH taken AS (
        DELETE FROM listener.inserted_rows AS i
        WHERE i.id = ANY(ARRAY(
            SELECT x.id FROM listener.inserted_rows AS x
            ORDER BY x.id LIMIT p_limit
            FOR UPDATE SKIP LOCKED))
        RETURNING i.id, i.source_table, i.source_id, i.inserted_at
    )
    SELECT array_agg(t.id), array_agg(t.source_table), array_agg(t.source_id),
           array_agg(t.inserted_at)
    INTO ids, tables, keys, stamps
    FROM taken AS t;
    IF ids IS NULL THEN
        RETURN;
    END IF;
    -- Held until commit, before any row is read: claim_deleted_rows() waits for it.
    LOCK TABLE listener.admission_lock IN ROW SHARE MODE;
    taken := cardinality(ids);
    FOR a IN
        SELECT x.source_table, x.table_oid, e.ids, e.keys
        FROM listener.attachments AS x
        CROSS JOIN LATERAL (
            SELECT array_agg(d.id) AS ids, array_agg(d.source_id) AS keys
            FROM (SELECT DISTINCT ON (u.source_id) u.id, u.source_id
                  FROM unnest(ids, tables, keys) AS u(id, source_table, source_id)
                  WHERE u.source_table = x.source_table
                  ORDER BY u.source_id, u.id DESC) AS d
        ) AS e
        WHERE x.source_table = ANY(tables)
        ORDER BY x.source_table
    LOOP
        BEGIN
            EXECUTE format('SELECT * FROM listener.%I($1, $2, $3, $4, $5, $6, $7)',
                           'admit_' || a.table_oid)
            INTO r
            USING a.ids, a.keys, greatest(p_room - cardinality(claimed), 0), p_worker,
                  p_lease_s, p_token, p_max_attempts;
            admitted := admitted + r.made;
            claimed := claimed || r.claimed;
        EXCEPTION WHEN OTHERS THEN
            IF to_regclass(a.source_table) IS NOT NULL THEN
                INSERT INTO listener.inserted_rows (id, source_table, source_id, inserted_at)
                SELECT u.id, u.source_table, u.source_id, u.inserted_at
                FROM unnest(ids, tables, keys, stamps)
                     AS u(id, source_table, source_id, inserted_at)
                WHERE u.source_table = a.source_table;
            END IF;
            RAISE WARNING 'rows inserted into % not admitted: %', a.source_table, SQLERRM;
        END;
    END LOOP;
END;
$$;
