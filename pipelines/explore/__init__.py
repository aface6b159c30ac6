"""`python -m pipelines.explore`: a web app over an embed output (search, neighbours, reports, near-duplicates)."""
