"""The embed job's runners: `local` (a DataLoader on this machine) and `ray` (Ray Data across a cluster).

Both take the same `split.Job` (the job's settings) and the records of each split, and share the split
bookkeeping in `split` (resume state, errors file, stats, the part writer's life), so their output is the same.
`job` runs one embed job around a runner (checks, lock, listing, summary); `pipelines.embed` is its command line.
"""
