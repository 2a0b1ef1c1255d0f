"""Distributed clip jobs: arq workers sharing one Redis, results in object storage.

- ``records``: what is kept in Redis and the atomic (Lua) steps that change it, fenced.
- ``api``: the API's side (``ArqQueue``): accepting jobs within each caller's share, reading them.
- ``lease``: a run's lease and fencing token, renewed while it runs (and why beside arq).
- ``worker``: ``hermes-media worker``: running jobs, delivering webhooks.
- ``sweeper``: what any worker does for all: lapsed leases, deadlines, expired results.

Results live only in the configured object storage (``HERMES_CLIP_STORAGE_URL``, S3 or a
shared directory), never in Redis: a clip for a direct caller may be far larger than a Redis
value should be. Every result is listed with its deletion time in Redis before it is uploaded,
and workers sweep that list, so a result no job records (a worker killed between upload and
state update, a run that lost its job) is still deleted in time.

Faults: a worker killed mid-job stops renewing its lease, and another worker runs the job again
within about 20 s, whatever the job time limit. While Redis is down the API answers 503 and
workers wait; both carry on when it returns.
"""
