-- 0024_face_index_intents: the Rekognition faces step records each IndexFaces request before
-- it sends it, fenced by the job's lease. A run that dies after IndexFaces and before its step
-- is stored leaves faces that listener never recorded; its intent says so. A later claim of
-- the job cleans up (ListFaces of the collection, DeleteFaces of the unrecorded faces) only
-- when an earlier claim left an intent: a job claimed again for any other reason (a failed
-- fetch, another step's error, a lease that expired before the faces step) lists nothing. A
-- worker whose lease was taken over cannot record an intent, so it does not send IndexFaces.
-- The faces effect's writer deletes the job's intents in the transaction that stores the step.
CREATE TABLE listener.face_index_intents (
    job_id            bigint      NOT NULL REFERENCES listener.jobs (id) ON DELETE CASCADE,
    claims            integer     NOT NULL,
    collection_id     text        NOT NULL,
    external_image_id text        NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, claims)
);
