-- Which quotad process wrote the snapshot: a retried snapshot whose commit
-- answer was lost finds its own position written by itself, which is not
-- the same as finding it written by another quotad on the same database.
ALTER TABLE quotad_snapshot ADD COLUMN writer text NOT NULL DEFAULT '';
