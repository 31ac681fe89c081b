"""nomadsim: a test double of Nomad's HTTP API that runs dispatched task groups on real Docker.

Checked against Nomad v1.6.5 (dev agent, docker driver, Consul 1.8.7, 2026-11-30): the
tests in ``tests/test_nomadsim.py`` and ``tests/test_nomad_e2e.py`` pass unchanged
against that agent (``just test-nomad-real``). What the double got wrong until then,
now imitated and pinned by those tests: ``StartedAt``/``FinishedAt``/``LastRestart``
are ``null`` (not Go's zero time) before they happen; the client sends alloc updates
in 200 ms batches, so a short task goes pending -> complete with no running event;
answers are gzipped (streams flushed per write) for clients that accept it, so raw
reads of a followed log see compressed bytes; ``fs/readat`` of a missing file answers
200 with the error text as the body (``fs/ls``/``fs/stat`` answer 404); a docker
``security_opt`` ``seccomp=`` value is a path on the client that the driver reads.

Start it from a fixture::

    sim = NomadSim(docker_client=docker.from_env())
    addr = sim.start()          # "http://127.0.0.1:<port>"
    ...
    sim.stop()                  # kills tasks, removes containers and alloc dirs

Test switches: ``sim.hold = True`` (placements fail as on a full cluster;
it applies when the scheduler thread takes the evaluation up, so keep it on
until ``sim.held`` counts the dispatches; ``sim.release(n)`` places the next
n), ``NomadSim(node_memory_mb=...)`` (demands bigger than the node never
place), ``sim.fail_dispatch(text, times=None)`` (dispatch answers 500, for
the next ``times`` calls or until ``fail_dispatch(None)``),
``sim.set_reachable(False)`` (stop listening; ``True`` listens again on the
same port), ``sim.lose(alloc_id)`` (the node under an alloc dies),
``NomadSim(token=...)`` (ACLs on), ``sim.gc()`` (system GC).

The same tests are meant to run against a real agent
(``PYEXEC_TEST_NOMAD_ADDR``), so the sim speaks Nomad's wire format. All
sources are files in github.com/hashicorp/nomad (main, 2026) unless a URL is
given; Go structs are serialised with their Go field names (PascalCase).

Layout: ``server.py`` (NomadSim: lifecycle, switches, uvicorn thread),
``api.py`` (the /v1 routes, blocking queries, logs, event stream),
``cluster.py`` (register, dispatch, schedule, stop, GC), ``records.py``
(Nomad-shaped JSON records), ``state.py`` (tables, raft-like index, event
buffer), ``jobspec.py`` (job defaults, dispatch checks, env, interpolation,
constraints), ``allocrunner.py`` / ``taskrunner.py`` (the client: lifecycle
phases, task events), ``dockerconfig.py`` (docker driver options).

Faithful (with the source of each behaviour)
-------------------------------------------
- ``PUT/POST /v1/jobs`` and ``/v1/job/<id>``: body ``{"Job": ...}``, 400 texts
  "Job must be specified" / "Job ID hasn't been provided" / "Job ID does not
  match name"; answer ``{EvalID, EvalCreateIndex, JobModifyIndex, Warnings,
  Index, ...}``; parameterized jobs get no evaluation
  (command/agent/job_endpoint.go, nomad/job_endpoint.go, api/jobs.go).
- ``GET /v1/job/<id>``: 404 with text body "job not found"; ``GET /v1/jobs?prefix=``
  gives ``JobListStub`` rows (api/jobs.go) with a ``JobSummary``;
  ``GET /v1/job/<id>/summary`` (``Summary[tg]`` Queued/Starting/Running/
  Complete/Failed/Lost, ``Children`` Pending/Running/Dead of a parameterized
  parent); ``GET /v1/allocations?prefix=``.
- Dispatch: checks and texts of ``Job.Dispatch`` / ``validateDispatchRequest``
  in nomad/job_endpoint.go, all answered as HTTP 500 (plain errors become 500
  in ``HTTPServer.wrap``, command/agent/http.go): "parameterized job not
  found" (unknown job is 500, not 404), "Specified job %q is not a
  parameterized job", "Specified job %q is stopped", payload required /
  forbidden, "Payload exceeds maximum size; N > 16384", "Dispatch request
  included unpermitted metadata keys: [a b]", "Dispatch did not provide
  required meta keys: [a]". ``?idempotency_token=`` (``parseIdempotencyToken``)
  returns the existing child while it exists. Child IDs from
  ``structs.DispatchedID``: ``<parent>/dispatch-[<prefix>-]<unix>-<8 hex>``.
  Answer ``{DispatchedJobID, EvalID, EvalCreateIndex, JobCreateIndex, Index}``.
- ``DELETE /v1/job/<id>[?purge=true]``: job ``Stop``, an evaluation triggered
  by "job-deregister", allocs ``DesiredStatus=stop``; a missing job is a 200
  with an empty ``EvalID`` (``Job.Deregister`` returns nil).
- Job ``Status`` from ``getJobStatus`` (nomad/state/state_store.go):
  parameterized parents are "running"; children pending → running → dead; an
  alloc counts as terminal once its ``DesiredStatus`` is stop.
- Allocations: ``AllocListStub`` rows for ``/v1/job/<id>/allocations``, full
  ``Allocation`` for ``/v1/allocation/<id>`` (api/allocations.go); 404
  "alloc not found". ``ClientStatus`` from ``getClientStatus``
  (client/allocrunner/alloc_runner.go): any failed task → failed (even while
  poststop still runs), else running, else pending, else complete.
- Task states/events (nomad/structs/structs.go ``TaskEvent`` setters and
  ``PopulateEventDisplayMessage``; taskrunner/task_runner.go;
  restarts/restarts.go): Received, Task Setup ("Building Task Directory"),
  Started, Terminated with ``Details`` exit_code / signal / oom_killed as
  strings (+ exit_message), "Not Restarting" with "Policy allows no restarts"
  and ``FailsTask``, Restarting when attempts > 0, Killing ("Sent interrupt.
  Waiting 5s before force killing", ``Details.kill_timeout``), Killed,
  "Sibling Task Failed", "Main Tasks Dead". Docker exit results
  (drivers/docker/handle.go): signal is always 0, non-zero exit message
  "Docker container exited with non-zero exit code: N", OOM → "OOM Killed".
  ``Time`` is unix nanoseconds; ``StartedAt``/``FinishedAt`` are RFC 3339
  ``null`` before they happen (Nomad 1.6.5: a task that never started has
  ``StartedAt: null``, not Go's zero time).
- Lifecycle (alloc_runner.go ``handleTaskStateUpdates``, lifecycle docs
  https://developer.hashicorp.com/nomad/docs/job-specification/lifecycle):
  prestart non-sidecar tasks must exit 0 before main tasks start; a failed
  task kills its live siblings; poststop runs once all other tasks are dead,
  after failures and after a job stop.
- Docker task config (drivers/docker/driver.go, config.go; see
  dockerconfig.py): image, command + args, entrypoint, network_mode,
  readonly_rootfs, cap_drop/cap_add, security_opt, pids_limit, tmpfs
  ``mount`` with ``tmpfs_options``, work_dir, labels, init, hostname,
  dns_servers, extra_hosts, shm_size, sysctl, ulimit, oom_score_adj,
  memory_hard_limit, task ``user``; memory limit = max(MemoryMaxMB,
  memory_hard_limit) or MemoryMB, with MemoryMB as reservation then
  (``memoryLimits``), swap = limit, cpu shares = CPU. An unknown option, or a
  known one the sim does not carry out (volumes, ports, privileged, ...),
  fails the task with "Driver Failure" instead of being ignored. Containers
  are named ``<task>-<alloc id>``. ``network_mode`` goes to Docker as the driver
  passes it (``bridge``, Docker's default network and the default when unset,
  ``host``, ``none``); the node fingerprints no ``unique.network.ip-address``, so
  tests give the tasks a literal address. Kill: ``kill_signal`` (default SIGTERM)
  then SIGKILL after ``kill_timeout`` (capped by the client's
  max_kill_timeout, 30s).
- Client GC (client/gc.go ``keepUsageBelowThreshold``, client config
  ``gc_max_allocs`` = 50, ``gc_interval`` = 1m): once the client tracks more
  allocs than that, the oldest terminal ones are destroyed (alloc dir and
  logs gone: the logs endpoint answers 404 'Unknown allocation "<id>"'),
  while the server still serves the alloc record. Checked on every placement
  and every interval; ``NomadSim(client_gc_max_allocs=None)`` turns it off.
  Disk and inode thresholds are not simulated.
- Lost node (``sim.lose``): ``ClientStatus=lost``, ``DesiredStatus=stop``,
  ``TaskStates`` frozen at the last client report, no poststop.
- Alloc dir (client/allocdir): ``alloc/`` shared and mounted at /alloc,
  ``<task>/local`` at /local, ``<task>/secrets`` at /secrets; logs in
  ``alloc/logs/<task>.stdout.0``; ``dispatch_payload.File`` lands in
  ``local/<file>``; env from client/taskenv/env.go (NOMAD_ALLOC_DIR,
  NOMAD_TASK_DIR, NOMAD_SECRETS_DIR, NOMAD_ALLOC_ID, NOMAD_JOB_ID,
  NOMAD_JOB_PARENT_ID, NOMAD_META_<key> in both cases, optional meta as "",
  NOMAD_DC, ...); ``${...}`` interpolation in config/env/template dest leaves
  unknown names verbatim (``ReplaceEnv``).
- Logs (command/agent/fs_endpoint.go, client/fs_endpoint.go): 400 texts for
  missing task/type, 400 "unknown task name", 404 "task %q not started yet.
  No logs available", 404 'Unknown allocation "<id>"'; ``plain=true`` raw
  bytes, else ``StreamFrame`` JSON objects ``{Offset, Data, File}``
  (omitempty, ``Offset`` = file offset after the frame, ≤64 KiB per frame)
  written back to back with no separator, ``{}`` heartbeats when following;
  ``follow=true`` never ends by itself (no task-state check in the client's
  logs code), only when the caller hangs up or the file is deleted (a
  ``FileEvent: "file deleted"`` frame).
- Blocking queries (nomad/rpc.go ``blockingRPC``, structs ``TimeToBlock``):
  ``?index=N&wait=D``; the answer's index is the *table* index (jobs /
  allocs / evals, as ``state.Index("allocs")``), so a query whose N is below
  it answers at once even if its own rows did not change (clients must loop
  with the new index, as against Nomad); otherwise it waits until the
  watched rows change or wait (+ up to wait/16 jitter, default and cap 5m)
  runs out; headers X-Nomad-Index / X-Nomad-KnownLeader /
  X-Nomad-LastContact; "Invalid wait time" 400.
- Event stream (command/agent/event_endpoint.go, nomad/stream/ndjson.go,
  nomad/state/events.go, event_buffer.go): ``topic=Topic:Key`` (repeatable,
  bare topic = ``*``); key matches ``Key`` or any ``FilterKeys`` (allocs and
  evals carry ``[JobID, DeploymentID]``); one ndjson line ``{Index, Events}``
  per raft index; ``{}`` first and every 30 s; alloc payloads drop ``Job``;
  ``index=N`` replays the buffer from the first entry ≥ N, ``index=0`` replays
  the whole buffer (default 100 entries, ``event_buffer_size``).
- Placement failure (scheduler/generic_sched.go, api/evaluations.go): the
  evaluation completes with ``FailedTGAllocs{tg: AllocationMetric}``
  (NodesEvaluated, NodesExhausted, DimensionExhausted) and a ``BlockedEval``
  whose status is "blocked" (TriggeredBy "queued-allocs", "created to place
  remaining allocations"); the job stays pending. Job/group/task
  constraints are checked against the node (``checkConstraint`` in
  scheduler/feasible/feasible.go: =, !=, is_set, is_not_set, regexp,
  set_contains*; version/semver/ordering pass unchecked) and fail as
  ``NodesFiltered`` + ``ConstraintFiltered{"<L> <op> <R>": 1}``; a job whose
  ``Datacenters`` globs or ``NodePool`` miss the node evaluates no node.
- ACLs (command/agent/http.go, nomad/structs/errors.go): X-Nomad-Token or
  ``Authorization: Bearer``; none → 403 "Permission denied", unknown → 403
  "ACL token not found".

Simplified (and why it is fine for pyexec's tests)
--------------------------------------------------
- One node (dc1, pool default, 4000 MHz / 8192 MB unless told), one
  region, any namespace accepted; no deployments, services, ports, affinities
  or spreads; no system/service scheduling beyond starting each group
  ``Count`` times; no capacity accounting between allocs (``hold`` stands
  in for a full cluster).
- Templates: literal ones, and the few consul-template actions pyexec's runner job
  uses (``consultmpl``: ``range ls``/``.Value``, ``keyOrDefault``, ``env``,
  ``printf``), rendered from the Consul given as ``consul_addr`` (default the
  node's 127.0.0.1:8500, as Nomad's client); anything else fails the task with
  "Setup Failure". ``nomadVar``/env templates are not supported.
- Reschedule policies are recorded but never act (nothing is re-placed);
  restart policies with attempts > 0 do re-run the container.
- Logs never rotate (one ``.0`` file per stream); the log copier is joined before the
  Terminated event, so logs are complete when a task shows dead (Nomad's
  logmon may lag a little).
- The stored child job keeps ``Payload`` raw (Nomad snappy-compresses it).
- Capacity: ``hold`` reports the memory dimension exhausted for every new
  placement; otherwise only a group bigger than the whole node fails.
- Server GC is manual: dead jobs, their evals and terminal allocs stay until
  ``PUT /v1/system/gc`` (``sim.gc()``) or ``sim.stop()`` (Nomad's
  job_gc_threshold is 4h). Containers are removed as soon as their task is
  dead (the docker driver removes them on task destroy).
- A poststop task is not killed by a job stop that arrives while it runs.
"""

from __future__ import annotations

from .server import NomadSim

__all__ = ["NomadSim"]
