"""The eval API's logic: JSON code in, a run of it in the sandbox, result and errors out.

- ``request``: the JSON body, checked (``parse_eval_request``)
- ``imports``, ``distributions``, ``stdlib_names``: third-party imports and what to install
- ``archive``, ``sandbox``: the tar with the user's files and the in-sandbox wrapper
- ``outcome``: the wrapper's report taken out of stderr, traceback parsing
- ``job``: all of it put together for ``ExecutionService.run`` (``prepare``)
"""

from __future__ import annotations

from .job import EvalJob, prepare
from .outcome import finish_outcome, finish_record, is_eval_request
from .request import EvalRequest, parse_eval_request

__all__ = [
    "EvalJob",
    "EvalRequest",
    "finish_outcome",
    "finish_record",
    "is_eval_request",
    "parse_eval_request",
    "prepare",
]
