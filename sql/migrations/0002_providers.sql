-- 0002_providers: paid providers. Cost and tokens per result, fleet-wide rate limits, faces.

-- What each step cost, so spend and budgets are a SUM away.
ALTER TABLE listener.results
    ADD COLUMN input_tokens  integer,
    ADD COLUMN output_tokens integer,
    ADD COLUMN calls         integer NOT NULL DEFAULT 0,
    ADD COLUMN cost_usd      numeric(16, 9) NOT NULL DEFAULT 0;
CREATE INDEX results_created_idx ON listener.results (created_at);

-- One row per rate-limited provider, shared by every daemon: the state of its generic cell
-- rate algorithm (GCRA) for requests and for tokens, as theoretical arrival times in epoch
-- seconds of the database clock, and a pause that stops every daemon at once.
CREATE TABLE listener.provider_limits (
    provider      text             PRIMARY KEY,
    request_tat   double precision NOT NULL DEFAULT 0,
    token_tat     double precision NOT NULL DEFAULT 0,
    paused_until  double precision NOT NULL DEFAULT 0,
    pause_reason  text,
    updated_at    timestamptz      NOT NULL DEFAULT now()
);

-- Faces, per owner: a Rekognition collection per owner, the faces indexed into it, the people
-- they are assigned to, and suggestions for review.
CREATE TABLE listener.people (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id      text,
    collection_id text        NOT NULL,
    name          text,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE listener.faces (
    face_id       text        PRIMARY KEY,
    collection_id text        NOT NULL,
    owner_id      text,
    job_id        bigint      REFERENCES listener.jobs (id) ON DELETE SET NULL,
    source_table  text        NOT NULL,
    source_id     text        NOT NULL,
    person_id     bigint      REFERENCES listener.people (id) ON DELETE SET NULL,
    bounding_box  jsonb,
    confidence    double precision,
    matched_face  text,
    similarity    double precision,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX faces_person_idx ON listener.faces (person_id);
CREATE INDEX faces_source_idx ON listener.faces (source_table, source_id);

CREATE TABLE listener.face_suggestions (
    face_id           text        NOT NULL REFERENCES listener.faces (face_id) ON DELETE CASCADE,
    candidate_face_id text        NOT NULL,
    person_id         bigint      REFERENCES listener.people (id) ON DELETE CASCADE,
    similarity        double precision NOT NULL,
    status            text        NOT NULL DEFAULT 'open'
                      CHECK (status IN ('open', 'accepted', 'rejected')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (face_id, candidate_face_id)
);

-- A job whose URL changed starts over: its old results describe another image.
CREATE FUNCTION listener.forget_results_on_reset() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM listener.results WHERE job_id = NEW.id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_forget_results
    AFTER UPDATE OF image_url ON listener.jobs
    FOR EACH ROW WHEN (OLD.image_url IS DISTINCT FROM NEW.image_url)
    EXECUTE FUNCTION listener.forget_results_on_reset();

-- assign_face(face, matched face, similarity): puts `face` in the person of `matched`,
-- creating that person (with both faces) when the matched face had none. The matched face's
-- row is locked, so two images matching the same unassigned face at once share one person.
CREATE FUNCTION listener.assign_face(p_face text, p_matched text, p_similarity float8)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    matched listener.faces;
    person bigint;
BEGIN
    SELECT * INTO matched FROM listener.faces WHERE face_id = p_matched FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    person := matched.person_id;
    IF person IS NULL THEN
        INSERT INTO listener.people (owner_id, collection_id)
        VALUES (matched.owner_id, matched.collection_id)
        RETURNING id INTO person;
        UPDATE listener.faces SET person_id = person WHERE face_id = p_matched;
    END IF;
    UPDATE listener.faces
    SET person_id = person, matched_face = p_matched, similarity = p_similarity
    WHERE face_id = p_face;
    RETURN person;
END;
$$;
