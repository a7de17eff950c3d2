-- Leave room in each page so that an upsert can write the new row version beside the old one
-- (a HOT update: no index entry to add, since the key never changes). Measured with
-- `python -m bench.run`: the batch upsert 5-10% faster. Applies to pages written from now on.
ALTER TABLE customers SET (fillfactor = 70);
