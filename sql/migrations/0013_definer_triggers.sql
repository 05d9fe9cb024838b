-- 0013_definer_triggers: every trigger function of listener runs as its owner.
--
-- The app's own writes fire listener's triggers: an insert into an attached table enqueues a
-- job, and job changes append to listener's counters, outbox and events. An app that writes
-- with a role of its own (Supabase's `authenticated`, say) has no rights on the listener
-- schema, and its insert must not fail because of listener. So each trigger function runs as
-- the role that migrated listener (SECURITY DEFINER), with a search_path that only trusts the
-- system catalog: every name in them is schema-qualified. Trigger functions cannot be called
-- directly, so this gives no one a way to run them outside their triggers. attach() generates
-- its per-table functions the same way (0005), and migrate regenerates those of tables
-- attached before (0011's reattach_all).
DO $$
DECLARE
    fn regprocedure;
BEGIN
    FOR fn IN
        SELECT p.oid::regprocedure
        FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
        WHERE n.nspname = 'listener' AND p.prorettype = 'trigger'::regtype
    LOOP
        EXECUTE format(
            'ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', fn);
    END LOOP;
END;
$$;
