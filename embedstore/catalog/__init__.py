"""The catalog: every file under an ingest's sources, with its header facts, kept in the store's
`files` table. Listed as a stream, compared with the table so only new and changed files are read,
read on every core or Ray node, committed in batches (a killed catalog resumes), and planned series by
series with DuckDB anti-joins against each model's committed rows."""
