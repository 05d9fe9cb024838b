-- 0012_operations: operator pauses, jobs held by a pause, backfill of chosen rows, retention.
--
-- Pauses. `listener pause [PROVIDER]` writes one row here ('*': the whole pipeline); `listener
-- resume` deletes it. A daemon reads this table at most once per poll interval:
--   * '*' paused, or every provider of its pipeline paused: it does not claim at all, so no
--     job row is touched while the pause lasts;
--   * some providers paused: jobs are claimed, and a step of a paused provider ends the run
--     with a snooze whose delay lasts until the pause ends (`until`; a day for a pause without
--     an end) and which records the provider in jobs.held_by: one write per job per pause,
--     never one every few minutes. `listener resume` wakes the jobs it held at once.
-- A spent daily budget holds jobs the same way (held_by = 'budget', until 00:00 UTC).
CREATE TABLE listener.pauses (
    provider  text        PRIMARY KEY,
    reason    text,
    until     timestamptz,
    paused_at timestamptz NOT NULL DEFAULT now()
);

-- What holds a pending job that was snoozed by an operator pause or the spent budget (a
-- provider name, '*' or 'budget'); NULL for every other job. Cleared when the job is woken.
ALTER TABLE listener.jobs ADD COLUMN held_by text;
CREATE INDEX jobs_held_idx ON listener.jobs (held_by) WHERE held_by IS NOT NULL;

-- backfill_ids(table, ids, priority, max_attempts, batch): enqueues the rows p_ids of an
-- attached table (chosen by the operator's read-only --where / --limit-per-owner selection)
-- that have no job yet; rows that have one are left alone (ON CONFLICT DO NOTHING), so a row
-- enqueued by its trigger meanwhile is never enqueued twice. Returns the jobs created per owner.
CREATE FUNCTION listener.backfill_ids(
    p_table text, p_ids text[], p_priority integer, p_max_attempts integer, p_batch boolean
) RETURNS TABLE (owner_id text, enqueued integer)
LANGUAGE plpgsql AS $$
DECLARE
    a listener.attachments := listener.attachment(p_table);
BEGIN
    RETURN QUERY EXECUTE format($q$
        WITH ins AS (
            INSERT INTO listener.jobs
                (source_table, source_id, image_url, owner_id, priority, max_attempts,
                 batch_mode)
            SELECT %1$L, s.%2$I::text, s.%3$I::text, %4$s, $2, $3, $4
            FROM %5$s AS s
            WHERE s.%2$I = ANY($1::%6$s[])
            ON CONFLICT (source_table, source_id) DO NOTHING
            RETURNING listener.jobs.owner_id
        )
        SELECT ins.owner_id, count(*)::int FROM ins GROUP BY ins.owner_id
    $q$,
        a.source_table, a.id_column, a.url_column,
        CASE WHEN a.owner_column IS NULL THEN 'NULL::text'
             ELSE format('s.%I::text', a.owner_column) END,
        a.source_table, a.id_type)
    USING p_ids, p_priority, p_max_attempts, p_batch;
    IF FOUND THEN
        PERFORM pg_notify('listener_jobs', '');
    END IF;
END;
$$;

-- prune_jobs(before, limit, dry_run): retention. Results are read by joining listener.jobs
-- (and cascade with it), and a row without a job would be enqueued (and paid for) again by the
-- next backfill, so a job is pruned only when nobody can read it any more: it is finished
-- (complete, failed, cancelled) before p_before AND its app row no longer exists. Jobs of
-- tables no longer attached are kept (detach keeps jobs and results). Each call deletes at
-- most p_limit jobs, oldest first, skipping locked rows, so it never holds long locks; with
-- p_dry_run it counts every job that would go and deletes nothing.
CREATE FUNCTION listener.prune_jobs(
    p_before timestamptz, p_limit integer, p_dry_run boolean
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    a listener.attachments;
    n integer;
    total integer := 0;
BEGIN
    FOR a IN SELECT * FROM listener.attachments ORDER BY source_table LOOP
        EXIT WHEN NOT p_dry_run AND total >= p_limit;
        IF p_dry_run THEN
            EXECUTE format($q$
                SELECT count(*)::int FROM listener.jobs AS j
                WHERE j.source_table = %1$L
                  AND j.status IN ('complete', 'failed', 'cancelled') AND j.finished_at < $1
                  AND NOT EXISTS (SELECT 1 FROM %2$s AS s WHERE s.%3$I = j.source_id::%4$s)
            $q$, a.source_table, a.source_table, a.id_column, a.id_type)
            INTO n USING p_before;
        ELSE
            EXECUTE format($q$
                WITH doomed AS (
                    SELECT j.id FROM listener.jobs AS j
                    WHERE j.source_table = %1$L
                      AND j.status IN ('complete', 'failed', 'cancelled')
                      AND j.finished_at < $1
                      AND NOT EXISTS (
                          SELECT 1 FROM %2$s AS s WHERE s.%3$I = j.source_id::%4$s)
                    ORDER BY j.finished_at
                    LIMIT $2
                    FOR UPDATE SKIP LOCKED
                )
                DELETE FROM listener.jobs AS j USING doomed
                WHERE j.id = doomed.id
                  AND j.status IN ('complete', 'failed', 'cancelled')
            $q$, a.source_table, a.source_table, a.id_column, a.id_type)
            USING p_before, p_limit - total;
            GET DIAGNOSTICS n = ROW_COUNT;
        END IF;
        total := total + n;
    END LOOP;
    RETURN total;
END;
$$;
