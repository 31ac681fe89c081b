# Generated from _async.py by scripts/unasync.py: edit that file, then run the script.
"""The blocking client: ``BaseClient`` plus I/O over ``httpx.Client``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from ._base import (
    DEFAULT_SERVER,
    BaseClient,
    Call,
    Destination,
    RetryPolicy,
    Source,
    WaitPlan,
    body_start,
    check_execution_id,
    check_status,
    download_spool,
    retry_decision,
    rewind,
    translate,
)
from .events import EndEvent, StreamEvent, StreamPlan
from .models import Execution, Logs, RunOptions, ServerVersion, Submitted

__all__ = ["Client"]


class Client(BaseClient):
    """Talks to a pyexec server. Use as a context manager, or call ``close()``."""

    def __init__(
        self,
        base_url: str = DEFAULT_SERVER,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, token=token, timeout=timeout, retry=retry)
        self._http = httpx.Client(transport=transport, **self._http_options())

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call) -> httpx.Response:
        delays = self.retry.delays()
        start = body_start(call)
        while True:
            try:
                response = self._http.request(**self._request_args(call))
            except httpx.HTTPError as exc:
                delay = retry_decision(
                    call, delays, exc=exc, can_rewind=start is not None, url=self.base_url
                )
            else:
                delay = retry_decision(
                    call, delays, response=response, can_rewind=start is not None
                )
                if delay is None:
                    return response
            time.sleep(delay or 0.0)
            rewind(call, start)

    def run(
        self, source: Source, options: RunOptions | None = None, *, wait: float | None = None
    ) -> Execution:
        """Run ``source`` and return the finished record (``wait``: longest to block, s)."""
        return self.parse_execution(self._send(self.run_call(source, options, wait)))

    def submit(self, source: Source, options: RunOptions | None = None) -> Submitted:
        """Start running ``source``; returns at once with the execution id."""
        return self.parse_submitted(self._send(self.submit_call(source, options)))

    def get(self, execution_id: str, *, wait: float = 0) -> Execution:
        """The current record; with ``wait``, the server holds the answer up to that many
        seconds (0 to 60; it refuses more) until the execution is terminal."""
        return self.parse_execution(self._send(self.get_call(execution_id, wait)))

    def wait(self, execution_id: str, *, timeout: float = 300.0) -> Execution:
        """The record once terminal; ``WaitTimeout`` after ``timeout`` seconds."""
        plan = WaitPlan(self, execution_id, timeout)
        while True:
            record = self.parse_execution(self._send(plan.call()))
            delay = plan.after(record)
            if delay is None:
                return record
            time.sleep(delay)

    def logs(self, execution_id: str) -> Logs:
        return self.parse_logs(self._send(self.logs_call(execution_id)))

    def download_artifacts(self, execution_id: str, dest: Destination) -> list[Path]:
        """Write every artifact of an execution under ``dest`` (made if missing), at its
        relative path; nothing is ever written outside ``dest``. Returns the files. A
        dropped connection (or a 502/503) starts the download again, with the retry policy
        of every other call."""
        call = self.artifacts_call(execution_id)
        delays = self.retry.delays()
        with download_spool() as spool:
            while True:
                spool.seek(0)
                spool.truncate()
                try:
                    with self._http.stream(**self._request_args(call)) as response:
                        delay = retry_decision(call, delays, response=response)
                        if delay is None:
                            if response.status_code >= 400:
                                response.read()
                                check_status(response)
                            for chunk in response.iter_bytes():
                                spool.write(chunk)
                            return self.save_artifacts(spool, dest)
                except httpx.HTTPError as exc:
                    delay = retry_decision(call, delays, exc=exc, url=self.base_url)
                time.sleep(delay or 0.0)

    def kill(self, execution_id: str) -> Execution:
        """Stop an execution; killing a finished one returns its record unchanged."""
        return self.parse_execution(self._send(self.kill_call(execution_id)))

    def version(self) -> ServerVersion:
        return self.parse_version(self._send(self.version_call()))

    def health(self) -> dict[str, Any]:
        return self.parse_health(self._send(self.health_call()))

    def eval(
        self,
        code: str | Mapping[str, str],
        *,
        python_version: str | None = None,
        last_expr: bool | None = None,
        auto_requirements: bool | None = None,
        options: RunOptions | None = None,
        inline_artifacts: bool | None = None,
    ) -> Execution:
        """Run Python source (or name → source files) and return the finished record;
        ``inline_artifacts``: with the artifacts' bytes (``Artifact.content``, up to 1 MiB
        each)."""
        call = self.eval_call(
            code,
            python_version=python_version,
            last_expr=last_expr,
            auto_requirements=auto_requirements,
            options=options,
            inline_artifacts=inline_artifacts,
        )
        return self.parse_execution(self._send(call))

    def submit_eval(
        self,
        code: str | Mapping[str, str],
        *,
        python_version: str | None = None,
        last_expr: bool | None = None,
        auto_requirements: bool | None = None,
        options: RunOptions | None = None,
    ) -> Submitted:
        """Start evaluating ``code`` like ``eval``; returns at once with the execution id."""
        call = self.eval_call(
            code,
            python_version=python_version,
            last_expr=last_expr,
            auto_requirements=auto_requirements,
            options=options,
            submit=True,
        )
        return self.parse_submitted(self._send(call))

    def stream(
        self,
        execution_id: str,
        *,
        last_event_id: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[StreamEvent]:
        """The execution's events as they happen: ``StatusEvent``, ``OutputEvent`` (each
        piece of output), and last ``EndEvent`` with the final record. A dropped
        connection is reopened from the last event received (``Last-Event-ID``), so no
        output is lost or repeated; ``last_event_id`` resumes an earlier stream. With
        ``timeout``, the iteration just stops after that many seconds."""
        plan = StreamPlan(check_execution_id(execution_id), last_event_id, timeout=timeout)
        while not plan.expired():
            error: Exception | None = None
            try:
                with self._http.stream(**plan.request_args(self.timeout)) as response:
                    if response.status_code != 200:
                        response.read()
                        refused = plan.refused(response)
                        if refused is not None:
                            raise refused
                    else:
                        for line in response.iter_lines():
                            event = plan.feed(line)
                            if event is not None:
                                yield event
                            if isinstance(event, EndEvent) or plan.expired():
                                return
            except httpx.HTTPError as exc:
                if plan.expired():
                    return
                error = translate(exc, self.base_url)
            time.sleep(plan.broken(error))
