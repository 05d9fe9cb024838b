-- 0026_batch_records: no batch at the provider that listener has not recorded first, and none
-- left running that listener does not know.
--
-- A batch's row is recorded 'submitting' with its file and requests before anything is created
-- at the provider (as before). Creating it there is now claimed first: 'creating' (since
-- updated_at) says one daemon is calling the provider, so two daemons polling the same row no
-- longer create it twice (the second batch was recorded by nobody: never polled, never
-- applied, its spend never written). The provider's batch carries listener's batch id and this
-- installation's id in its metadata; every daemon sweeps the provider's recent batches and
-- adopts a batch of its own installation whose row has no provider id yet (its creator died
-- before recording the id), and cancels one whose row is gone, closed, or holds another batch
-- (listener/analysis/batches.py).

-- This database's listener: the id its provider batches carry (metadata listener_installation),
-- so a sweep only ever touches batches of its own installation, never those of another
-- database sharing the provider account. A copy of the database that runs daemons of its own
-- against the same account needs an id of its own:
--   UPDATE listener.installation SET id = gen_random_uuid();
CREATE TABLE listener.installation (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    id         uuid        NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO listener.installation DEFAULT VALUES;

-- Retention of batches that never reached the provider ('empty': no request could be written;
-- 'abandoned': handed back while being prepared): deleted LISTENER_BATCH__PRUNE_AFTER_DAYS
-- after they were closed, read by when they were closed.
CREATE INDEX batches_unsent_idx ON listener.batches (applied_at)
    WHERE status IN ('empty', 'abandoned');
