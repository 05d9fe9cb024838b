-- 0007_faces_effects: the faces step's database writes become an effect the job store applies
-- in the transaction that stores the step, fenced by the job's lease (PgJobStore.save_step).
-- Before, the provider wrote faces, people and suggestions while it ran: a worker whose lease
-- was lost still wrote them, and a crash before the step was stored left rows no step explains.

-- apply_face_effects(job, source table, source id, owner, effect): records the faces of one
-- image and acts on their decisions, in the caller's transaction. `effect` is the "faces"
-- effect: {"collection_id": text, "faces": [{"face_id", "bounding_box", "confidence",
-- "decision": "assigned" | "suggested" | "new", "matched_face_id", "similarity"}, ...]}.
-- Returns {face_id: person_id or null} for every face of the effect.
--
-- The matched faces are locked first, in face_id order: two images whose faces match the same
-- known faces in different orders would otherwise deadlock in assign_face, which locks each
-- matched face as it goes. Idempotent: applied twice (a step stored twice), the faces and
-- suggestions are not duplicated and each face keeps its person.
CREATE FUNCTION listener.apply_face_effects(
    p_job_id bigint, p_source_table text, p_source_id text, p_owner_id text, p_effect jsonb
) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    face jsonb;
    person bigint;
    people jsonb := '{}'::jsonb;
BEGIN
    INSERT INTO listener.faces
        (face_id, collection_id, owner_id, job_id, source_table, source_id, bounding_box,
         confidence)
    SELECT f->>'face_id', p_effect->>'collection_id', p_owner_id, p_job_id, p_source_table,
           p_source_id, f->'bounding_box', (f->>'confidence')::float8
    FROM jsonb_array_elements(coalesce(p_effect->'faces', '[]'::jsonb)) AS f
    ON CONFLICT (face_id) DO NOTHING;

    PERFORM 1 FROM listener.faces
    WHERE face_id IN (
        SELECT f->>'matched_face_id'
        FROM jsonb_array_elements(coalesce(p_effect->'faces', '[]'::jsonb)) AS f
        WHERE f->>'decision' = 'assigned'
    )
    ORDER BY face_id
    FOR UPDATE;

    FOR face IN SELECT * FROM jsonb_array_elements(coalesce(p_effect->'faces', '[]'::jsonb))
    LOOP
        person := NULL;
        IF face->>'decision' = 'assigned' THEN
            person := listener.assign_face(
                face->>'face_id', face->>'matched_face_id', (face->>'similarity')::float8);
        ELSIF face->>'decision' = 'suggested' THEN
            INSERT INTO listener.face_suggestions
                (face_id, candidate_face_id, person_id, similarity)
            SELECT face->>'face_id', m.face_id, m.person_id, (face->>'similarity')::float8
            FROM listener.faces AS m WHERE m.face_id = face->>'matched_face_id'
            ON CONFLICT (face_id, candidate_face_id) DO NOTHING;
        END IF;
        IF person IS NULL THEN  -- not assigned now: whatever person the face already has
            SELECT f.person_id INTO person FROM listener.faces AS f
            WHERE f.face_id = face->>'face_id';
        END IF;
        people := people || jsonb_build_object(face->>'face_id', person);
    END LOOP;
    RETURN people;
END;
$$;
