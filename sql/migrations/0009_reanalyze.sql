-- 0009_reanalyze: re-analysis on request, from the app (SQL or an RPC) and the operator's CLI.
--
-- listener.reanalyze(table, ids, priority) starts the chosen rows over from scratch, complete
-- ones included (an app's "Retag with AI" button). A row's job, whatever its state, goes back
-- to pending with its attempts reset and its stored results removed; its lease and its batch
-- are cleared, so a worker or a provider batch still busy with the old run writes nothing (the
-- store's fences no longer match). A row that never had a job gets one. One NOTIFY wakes the
-- daemons.
--
-- SECURITY DEFINER: an app role needs no rights on listener's tables, only
--   GRANT USAGE ON SCHEMA listener TO app_role;
--   GRANT EXECUTE ON FUNCTION listener.reanalyze(regclass, text[], integer) TO app_role;
-- and whoever may execute it may re-analyze (and so spend on) any attached table's rows.
CREATE FUNCTION listener.reanalyze(
    p_table regclass, p_ids text[], p_priority integer DEFAULT 0
) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    a listener.attachments;
    reset integer;
    created integer;
BEGIN
    SELECT * INTO a FROM listener.attachments WHERE table_oid = p_table::oid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not attached', p_table
            USING ERRCODE = 'undefined_object',
                  HINT = 'Run: listener attach TABLE --id-column ID --url-column URL';
    END IF;
    IF p_ids IS NULL OR cardinality(p_ids) = 0 THEN
        RETURN 0;
    END IF;
    IF cardinality(p_ids) > 100000 THEN
        RAISE EXCEPTION 'at most 100,000 rows per call (got %)', cardinality(p_ids)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;

    WITH restarted AS (
        UPDATE listener.jobs AS j
        SET status = 'pending', attempts = 0, run_after = now(), priority = p_priority,
            last_error = NULL, lease_token = NULL, lease_expires_at = NULL, worker_id = NULL,
            batch_id = NULL, batch_step = NULL, started_at = NULL, finished_at = NULL,
            updated_at = now()
        WHERE j.source_table = a.source_table AND j.source_id = ANY(p_ids)
        RETURNING j.id
    ), forgotten AS (
        DELETE FROM listener.results AS r USING restarted WHERE r.job_id = restarted.id
    )
    SELECT count(*) INTO reset FROM restarted;

    EXECUTE format(
        'INSERT INTO listener.jobs (source_table, source_id, image_url, owner_id, priority) '
        'SELECT %L, s.%I::text, s.%I::text, %s, $2 FROM %s AS s '
        'WHERE s.%I = ANY($1::%s[]) '
        'ON CONFLICT (source_table, source_id) DO NOTHING',
        a.source_table, a.id_column, a.url_column,
        CASE WHEN a.owner_column IS NULL THEN 'NULL::text'
             ELSE format('s.%I::text', a.owner_column) END,
        a.source_table, a.id_column, a.id_type)
    USING p_ids, p_priority;
    GET DIAGNOSTICS created = ROW_COUNT;

    IF reset + created > 0 THEN
        PERFORM pg_notify('listener_jobs', '');
    END IF;
    RETURN reset + created;
END;
$$;
REVOKE ALL ON FUNCTION listener.reanalyze(regclass, text[], integer) FROM PUBLIC;
