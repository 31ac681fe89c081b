"""From a checked eval request to what ``ExecutionService.run`` takes."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from pyexec.models import ExecutionRequest, RunOutcome
from pyexec.settings import Settings

from .archive import WRAPPER_PATH, build_archive, wrapper_source
from .distributions import distributions_for, merge_requirements
from .imports import third_party_imports
from .outcome import finish_outcome
from .request import EvalRequest

__all__ = ["MAX_RESULT_CHARS", "EvalJob", "detected_requirements", "prepare"]

#: The longest ``result`` reported; a longer repr is cut (it travels on stderr, whose
#: size counts against the run's output limit).
MAX_RESULT_CHARS = 64 * 1024


@attrs.frozen(kw_only=True)
class EvalJob:
    request: ExecutionRequest
    tar: io.BytesIO
    #: Record fields set at creation (``auto_requirements``), for ``ExecutionService.run``.
    initial: Mapping[str, Any]
    postprocess: Callable[[RunOutcome], RunOutcome]
    #: Answer with the artifacts' bytes inline (``ExecutionService.inline_artifacts``).
    inline_artifacts: bool = False


def detected_requirements(job: EvalRequest, settings: Settings) -> tuple[str, ...] | None:
    """Distributions to install for the program's imports; ``None`` when auto-install is off.

    Off when the request or the server turns it off, and when the setup phase has no
    network and the operator prewarms no dependency sets (an install could only fail;
    the missing import then says what is wrong).
    """
    if not (job.auto_requirements and (settings.setup_network or settings.deps_prewarm)):
        return None
    modules = third_party_imports(dict(job.files), job.entrypoint, job.python_version)
    return distributions_for(modules)


def prepare(job: EvalRequest, settings: Settings) -> EvalJob:
    """Detect requirements, build the archive with the wrapper, and the post-processing."""
    detected = detected_requirements(job, settings)
    requirements, added = merge_requirements(job.execution.requirements_txt, detected or ())
    if added and not settings.setup_network and not settings.deps_prewarmed(requirements):
        # No network for setup: only a prewarmed set can be had. Anything else stays as
        # asked, and the missing import's ModuleNotFoundError says what is wrong.
        requirements, added = job.execution.requirements_txt, ()
    result_limit = min(MAX_RESULT_CHARS, job.execution.config.max_output_bytes // 2)
    wrapper = wrapper_source(
        {
            "entrypoint": job.entrypoint,
            "eval_last_expr": job.eval_last_expr,
            "result_limit": max(result_limit, 1),
        }
    )
    request = attrs.evolve(job.execution, entrypoint=WRAPPER_PATH, requirements_txt=requirements)
    return EvalJob(
        request=request,
        tar=build_archive(job.files, wrapper),
        initial={} if detected is None else {"auto_requirements": added},
        postprocess=finish_outcome,
        inline_artifacts=job.inline_artifacts,
    )
