-- The last sequence of every profile that was erased or merged away, by a digest of its id
-- (the id is often a user id: only its SHA-256 digest is kept, as for erased identities).
-- A profile created again under the same id, once its identities are released, continues
-- above it: the segment engine keeps the erased subject's sequence to drop late copies of
-- its old changes, and would drop the new life's changes with them.
CREATE TABLE "profile".retired_profiles (
    dataset      text   NOT NULL,
    profile_hash bytea  NOT NULL,
    sequence     bigint NOT NULL,
    PRIMARY KEY (dataset, profile_hash)
);
