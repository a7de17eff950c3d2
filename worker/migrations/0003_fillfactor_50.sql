-- Room in each page for a new version of every row on it, so that an update stays on its page
-- and adds no index entry (HOT): a batch of updates costs Postgres about a quarter less than at
-- 70 (`python -m bench.run`, burst updates). Pages already written keep their old fill until
-- rewritten (VACUUM FULL or pg_repack), which is optional.
ALTER TABLE customers SET (fillfactor = 50);
