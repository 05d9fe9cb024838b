-- 0006_batch_fence: batches prepared outside any transaction, and fenced by batch id.
--
-- * A batch row is inserted 'preparing' together with the marking of its jobs (one short
--   statement), before its images are fetched and its file uploaded; the file id is recorded
--   when the upload is done, so input_file_id may be NULL until then. A 'preparing' batch
--   whose daemon went quiet (updated_at is its heartbeat) hands its jobs back.
-- * A job whose URL changes (the attach trigger's reset) leaves its batch: the batch's answer
--   is about the old image, and the batch fence (batch_id, status 'batched', batch_step)
--   then finds the job no longer in it.
ALTER TABLE listener.batches ALTER COLUMN input_file_id DROP NOT NULL;

-- The jobs held by a batch (membership checks, the fenced apply, the abandoned sweep).
CREATE INDEX jobs_in_batch_idx ON listener.jobs (batch_id)
    WHERE status = 'batched' AND batch_id IS NOT NULL;

-- The sweep of abandoned preparations reads them by heartbeat.
CREATE INDEX batches_preparing_idx ON listener.batches (updated_at)
    WHERE status = 'preparing' AND applied_at IS NULL;

CREATE FUNCTION listener.leave_batch_on_new_image() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.batch_id := NULL;
    NEW.batch_step := NULL;
    RETURN NEW;
END;
$$;

CREATE TRIGGER jobs_leave_batch_on_new_image
    BEFORE UPDATE OF image_url ON listener.jobs
    FOR EACH ROW WHEN (OLD.image_url IS DISTINCT FROM NEW.image_url)
    EXECUTE FUNCTION listener.leave_batch_on_new_image();
