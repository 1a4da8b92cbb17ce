-- Which history the snapshot belongs to and the epoch of it that may write
-- it (see src/storage/history.rs). A quotad recovering from Postgres sets the
-- next epoch in the transaction that attaches; every snapshot commit checks,
-- under the snapshot lock, that these are still its own, so a quotad of an
-- older epoch (an old disk that came back) writes nothing. '' and 0: written
-- by a quotad from before history identity; the first start of this version
-- names the history.
ALTER TABLE quotad_snapshot
    ADD COLUMN history_id text   NOT NULL DEFAULT '',
    ADD COLUMN epoch      bigint NOT NULL DEFAULT 0 CHECK (epoch >= 0);
