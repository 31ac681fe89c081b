"""``pyexec job`` (render/register the Nomad runner jobs) and ``pyexec bundle upload``.

These talk to Nomad and Consul directly, not to a pyexec server: they are the operator's
side of the Nomad backend (see docs/nomad.md). Settings come from the environment
(``NOMAD_ADDR``, ``CONSUL_HTTP_ADDR``, ``PYEXEC_*``), read here at the edge.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Annotated, Any

from cyclopts import App, Parameter

from pyexec.cli.options import UsageError
from pyexec.client import ArchiveError
from pyexec.errors import PyexecError
from pyexec.settings import Settings

__all__ = ["bundle_app", "job_app"]

job_app = App(name="job", help="The Nomad runner jobs (one per resource class).")
bundle_app = App(name="bundle", help="Bundles in Consul, for runs dispatched with `nomad`.")


def _settings() -> Settings:
    return Settings.from_env(os.environ)


def _fail(exc: PyexecError) -> int:
    sys.stderr.write(f"pyexec: {exc.message}\n")
    return 2 if exc.status_code < 500 else 1


@job_app.command
def render(
    *,
    resource_class: Annotated[
        str | None, Parameter(name="--class", help='Only this class, as `{"Job": ...}`.')
    ] = None,
) -> int:
    """Print the service's jobs as Nomad API JSON: the runner jobs, and the warm-pool and
    dependency prewarm jobs when configured (`nomad job run -json` reads one class)."""
    from pyexec.runner import nomad_job

    try:
        settings = _settings()
        jobs = nomad_job.service_jobs(settings)
    except PyexecError as exc:
        return _fail(exc)
    if resource_class is None:
        body: Any = [{"Job": job} for job in jobs]
    else:
        wanted = nomad_job.job_id_for(settings, resource_class)
        matching = [job for job in jobs if job["ID"] == wanted]
        if not matching:
            names = ", ".join(c.name for c in settings.nomad_resource_classes)
            sys.stderr.write(f"pyexec: no resource class {resource_class!r} (classes: {names})\n")
            return 2
        body = {"Job": matching[0]}
    sys.stdout.write(json.dumps(body, indent=2) + "\n")
    return 0


@job_app.command
def register() -> int:
    """Register (or update) every job the service uses in Nomad (as `job render` prints
    them); unchanged jobs stay as they are."""
    from pyexec.runner.nomad import NomadRunner

    async def go(settings: Settings) -> list[str]:
        runner = NomadRunner.from_settings(settings)
        try:
            return await runner.register_jobs()
        finally:
            await runner.aclose()

    try:
        settings = _settings()
        if not settings.nomad_addr:
            sys.stderr.write("pyexec: set NOMAD_ADDR to the Nomad agent's address\n")
            return 2
        for job_id in asyncio.run(go(settings)):
            sys.stdout.write(f"{job_id}\n")
    except PyexecError as exc:
        return _fail(exc)
    return 0


@bundle_app.command
def upload(
    path: Annotated[str, Parameter(help="A script, a directory or a .tar.")],
    *,
    entrypoint: Annotated[str | None, Parameter(help="File to run (default: main.py).")] = None,
    metadata: Annotated[
        str | None,
        Parameter(help="Request metadata as JSON, the schema of the API's `metadata` part."),
    ] = None,
) -> int:
    """Store a bundle and its request in Consul and print its execution id.

    Run it with `nomad job dispatch -meta execution_id=<id> pyexec-runner-<class>`
    (the command is printed on stderr); the result lands in Consul like any other.
    """
    from pyexec.cli.inputs import gather
    from pyexec.models import Execution, new_execution_id, parse_request
    from pyexec.runner import nomad_job
    from pyexec.store.consul import ConsulStore
    from pyexec.tarsafe import validate_tar

    try:
        settings = _settings()
        if not settings.consul_addr:
            sys.stderr.write("pyexec: set CONSUL_HTTP_ADDR to the Consul agent's address\n")
            return 2
        raw: Any = json.loads(metadata) if metadata else {}
        if not isinstance(raw, dict):
            sys.stderr.write("pyexec: --metadata must be a JSON object\n")
            return 2
        program = gather(path, entrypoint=entrypoint or raw.get("entrypoint"))
        raw["entrypoint"] = program.entrypoint
        request = parse_request(raw, settings)
        resource_class = nomad_job.pick_class(settings, request.config)
        with program.archive as archive:
            validate_tar(
                archive,
                entrypoint=request.entrypoint,
                max_entries=settings.max_tar_entries,
                max_bytes=settings.max_extracted_bytes,
            )
            archive.seek(0)
            record = Execution(execution_id=new_execution_id(), request=request)

            async def store() -> None:
                consul = ConsulStore.from_settings(settings)
                try:
                    await consul.create(record, archive)
                finally:
                    await consul.aclose()

            asyncio.run(store())
    except ValueError as exc:
        sys.stderr.write(f"pyexec: --metadata is not valid JSON: {exc}\n")
        return 2
    except (UsageError, ArchiveError) as exc:
        sys.stderr.write(f"pyexec: {exc}\n")
        return 2
    except PyexecError as exc:
        return _fail(exc)
    job_id = nomad_job.job_id(settings, resource_class)
    sys.stdout.write(f"{record.execution_id}\n")
    sys.stderr.write(
        f"run it with: nomad job dispatch -meta execution_id={record.execution_id} "
        f"-meta image={request.docker_image} {job_id}\n"
    )
    return 0
