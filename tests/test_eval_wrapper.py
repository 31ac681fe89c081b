"""The in-sandbox wrapper, run for real by local interpreters (no Docker), and its report.

Each run goes the way the service sends it: the eval body is parsed and
prepared, the archive extracted, its entrypoint (the wrapper) started with a
real interpreter, and the outcome passed through the job's postprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import attrs
import pytest

from pyexec.evaluate import parse_eval_request, prepare
from pyexec.evaluate.archive import WRAPPER_PATH
from pyexec.evaluate.outcome import finish_outcome, finish_record, parse_traceback, split_report
from pyexec.evaluate.wrapper import REPORT_MARK
from pyexec.models import (
    Execution,
    ExecutionRequest,
    Reason,
    RunOutcome,
    new_execution_id,
    parse_request,
)
from pyexec.settings import Settings

SETTINGS = Settings(
    python_images=(("3.11", "unused"),), default_python_version="3.11", eval_auto_requirements=False
)
PYENV = Path("/root/.pyenv/versions")


def interpreter(version: str) -> str | None:
    for path in sorted(PYENV.glob(f"{version}.*/bin/python3")):
        return str(path)
    return None


OTHER_VERSIONS = [
    pytest.param(
        interpreter(v),
        id=v,
        marks=pytest.mark.skipif(interpreter(v) is None, reason=f"no Python {v} interpreter here"),
    )
    for v in ("3.10", "3.12", "3.13")
]


class Local:
    """Runs eval bodies with a local interpreter in a fresh directory per run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def run(
        self, body: dict[str, Any], *, python: str = sys.executable, stdin: str = ""
    ) -> RunOutcome:
        job = prepare(parse_eval_request(body, SETTINGS), SETTINGS)
        self.count += 1
        workdir = self.root / f"run{self.count}"
        workdir.mkdir()
        with tarfile.open(fileobj=job.tar) as tar:
            tar.extractall(workdir, filter="data")
        proc = subprocess.run(
            [python, job.request.entrypoint, *job.request.script_args],
            cwd=workdir,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": os.environ["PATH"], "LANG": "C.UTF-8"},
        )
        outcome = RunOutcome(
            reason=Reason.EXITED,
            exit_code=proc.returncode,
            stdout=proc.stdout,
            stderr=proc.stderr,
        )
        return job.postprocess(outcome)

    def direct(self, files: dict[str, str], entrypoint: str = "main.py") -> str:
        """stderr of ``python3 <entrypoint>`` without the wrapper, for comparison."""
        self.count += 1
        workdir = self.root / f"run{self.count}"
        for name, content in files.items():
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            (workdir / name).write_text(content)
        proc = subprocess.run(
            [sys.executable, entrypoint],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": os.environ["PATH"], "LANG": "C.UTF-8"},
        )
        return proc.stderr.replace(str(workdir), "<dir>")


@pytest.fixture
def local(tmp_path: Path) -> Local:
    return Local(tmp_path)


def relative(outcome: RunOutcome, local: Local) -> str:
    """stderr with the run directory replaced, to compare with a direct run."""
    return outcome.stderr.replace(str(local.root / f"run{local.count}"), "<dir>")


# --- REPL results -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "result", "stdout"),
    [
        ("2 + 2", "4", ""),
        ("x = 5\nx * 2", "10", ""),
        ("x = 5", None, ""),
        ('print("hi")', None, "hi\n"),
        ("[1, 2, 3]", "[1, 2, 3]", ""),
        ('"hello"', "'hello'", ""),
        ("None", None, ""),
        ("", None, ""),
        ("def f():\n    return 3\n\nf()  # trailing comment\n", "3", ""),
    ],
)
def test_repl_results(local: Local, code: str, result: str | None, stdout: str) -> None:
    """With eval_last_expr the final expression's repr is the result (None for no value)."""
    outcome = local.run({"code": code, "eval_last_expr": True})
    assert outcome.exit_code == 0, outcome.stderr
    assert outcome.extra["result"] == result
    assert outcome.stdout == stdout
    assert outcome.stderr == ""
    assert outcome.extra["error_type"] is None


def test_without_eval_last_expr_there_is_no_result(local: Local) -> None:
    """eval_last_expr false (the default) runs the script plainly: no result."""
    outcome = local.run({"code": "print(2 + 2)\n2 + 2"})
    assert (outcome.stdout, outcome.extra["result"]) == ("4\n", None)


def test_final_expression_shares_the_main_namespace(local: Local) -> None:
    """The last expression sees the module's names, runs as __main__, and prints still show."""
    code = textwrap.dedent(
        """
        import sys
        items = []
        if __name__ == "__main__":
            items.append(__name__)
        print("side effect")
        (items, sys.modules["__main__"].__dict__ is globals())
        """
    )
    outcome = local.run({"code": code, "eval_last_expr": True})
    assert outcome.stdout == "side effect\n"
    assert outcome.extra["result"] == "(['__main__'], True)"


def test_classes_defined_in_main_pickle(local: Local) -> None:
    """Objects of classes defined in the program pickle by reference to __main__."""
    code = textwrap.dedent(
        """
        import pickle
        class Point:
            def __init__(self, x):
                self.x = x
        pickle.loads(pickle.dumps(Point(3))).x
        """
    )
    assert local.run({"code": code, "eval_last_expr": True}).extra["result"] == "3"


def test_top_level_await_is_supported(local: Local) -> None:
    """Top-level await works, and the final expression runs on the same event loop."""
    code = textwrap.dedent(
        """
        import asyncio
        queue = asyncio.Queue()
        await queue.put(21)
        async def double():
            return 2 * await queue.get()
        await double()
        """
    )
    outcome = local.run({"code": code, "eval_last_expr": True})
    assert outcome.exit_code == 0, outcome.stderr
    assert outcome.extra["result"] == "42"


def test_asyncio_run_in_plain_code_still_works(local: Local) -> None:
    """Code without top-level await that calls asyncio.run itself is not wrapped in a loop."""
    code = "import asyncio\nasync def f():\n    return 5\nasyncio.run(f())"
    assert local.run({"code": code, "eval_last_expr": True}).extra["result"] == "5"


def test_long_results_are_cut(local: Local) -> None:
    """A repr longer than the limit is cut and says how much is missing."""
    outcome = local.run({"code": "'x' * 100000", "eval_last_expr": True})
    result = outcome.extra["result"]
    assert result.startswith("'xxx")
    assert result.endswith("more characters]")
    assert len(result) < 70_000


# --- the program's environment ------------------------------------------------------------------


def test_argv_stdin_and_file_look_like_a_direct_run(local: Local) -> None:
    """sys.argv, __file__ and stdin are those of `python3 main.py args`."""
    code = textwrap.dedent(
        """
        import os, sys
        print(sys.argv)
        print(os.path.basename(__file__), os.path.isabs(__file__))
        print(sys.stdin.read().upper())
        """
    )
    outcome = local.run({"code": code, "script_args": ["-v", "x"]}, stdin="abc")
    assert outcome.stdout == "['main.py', '-v', 'x']\nmain.py True\nABC\n"


def test_nested_entrypoint_imports_its_siblings(local: Local) -> None:
    """sys.path[0] is the entrypoint's directory, as for `python3 src/app.py`."""
    files = [
        {"name": "src/app.py", "content": "import util\nprint(util.NAME)\nutil.NAME"},
        {"name": "src/util.py", "content": "NAME = 'util'\n"},
    ]
    body = {"files": files, "entrypoint": "src/app.py", "eval_last_expr": True}
    outcome = local.run(body)
    assert outcome.exit_code == 0, outcome.stderr
    assert (outcome.stdout, outcome.extra["result"]) == ("util\n", "'util'")


def test_a_local_module_can_shadow_the_stdlib_as_in_a_direct_run(local: Local) -> None:
    """The wrapper imports nothing a user file could shadow: a local json.py wins."""
    files = [
        {"name": "main.py", "content": "import json, ast, traceback\njson.MINE"},
        {"name": "json.py", "content": "MINE = 'local json'\n"},
    ]
    outcome = local.run({"files": files, "eval_last_expr": True})
    assert outcome.extra["result"] == "'local json'", outcome.stderr


def test_sys_exit_is_not_an_error(local: Local) -> None:
    """sys.exit(3) keeps its exit code and reports no error_type."""
    outcome = local.run({"code": "import sys\nprint('bye')\nsys.exit(3)"})
    assert (outcome.exit_code, outcome.stdout) == (3, "bye\n")
    assert outcome.extra["error_type"] is None
    assert outcome.stderr == ""


# --- errors ------------------------------------------------------------------------------


def test_name_error(local: Local) -> None:
    """A NameError reports its type and line; the traceback equals a direct run's."""
    code = "x = 1\nprint(x)\nprint(y)\n"
    outcome = local.run({"code": code, "eval_last_expr": True})
    assert outcome.exit_code == 1
    assert (outcome.extra["error_type"], outcome.extra["error_line"]) == ("NameError", 3)
    assert outcome.stdout == "1\n"
    assert relative(outcome, local) == local.direct({"main.py": code})
    assert "Traceback (most recent call last)" in outcome.stderr
    assert ".pyexec" not in outcome.stderr
    assert REPORT_MARK not in outcome.stderr


def test_zero_division_inside_a_function_reports_the_raise_site(local: Local) -> None:
    """An error raised inside a function reports the line in the function, not the call."""
    code = textwrap.dedent(
        """\
        def ratio(a, b):
            scale = 10
            return scale * a / b

        print(ratio(1, 2))
        print(ratio(1, 0))
        """
    )
    outcome = local.run({"code": code})
    assert (outcome.extra["error_type"], outcome.extra["error_line"]) == ("ZeroDivisionError", 3)
    assert relative(outcome, local) == local.direct({"main.py": code})


def test_syntax_error(local: Local) -> None:
    """A SyntaxError reports its own line and prints exactly as Python would."""
    code = "print('ok')\nif True\n    pass\n"
    outcome = local.run({"code": code, "eval_last_expr": True})
    assert (outcome.extra["error_type"], outcome.extra["error_line"]) == ("SyntaxError", 2)
    assert outcome.stdout == ""
    assert relative(outcome, local) == local.direct({"main.py": code})


def test_indentation_error_is_its_own_type(local: Local) -> None:
    """Subclasses of SyntaxError keep their own name."""
    outcome = local.run({"code": "def f():\nreturn 1\n"})
    assert (outcome.extra["error_type"], outcome.extra["error_line"]) == ("IndentationError", 2)


def test_module_not_found(local: Local) -> None:
    """A missing module is a ModuleNotFoundError at the import's line."""
    code = "import os\nimport surely_not_installed_pkg\n"
    outcome = local.run({"code": code})
    assert (outcome.extra["error_type"], outcome.extra["error_line"]) == ("ModuleNotFoundError", 2)
    assert relative(outcome, local) == local.direct({"main.py": code})


def test_error_in_another_module_reports_the_entrypoint_line(local: Local) -> None:
    """An error raised in a helper module points at the entrypoint line that called it."""
    files = {
        "main.py": "import helper\n\nhelper.boom()\n",
        "helper.py": "def boom():\n    {}['k']\n",
    }
    outcome = local.run({"files": [{"name": k, "content": v} for k, v in files.items()]})
    assert (outcome.extra["error_type"], outcome.extra["error_line"]) == ("KeyError", 3)
    assert relative(outcome, local) == local.direct(files)


def test_error_in_the_final_expression(local: Local) -> None:
    """An error while evaluating the final expression is reported at its line."""
    outcome = local.run({"code": "x = {}\n\nx['missing']", "eval_last_expr": True})
    assert (outcome.extra["error_type"], outcome.extra["error_line"]) == ("KeyError", 3)
    assert outcome.extra["result"] is None


def test_error_in_the_results_repr(local: Local) -> None:
    """A __repr__ that raises fails the run at the raise site, as the REPL would show it."""
    code = "class A:\n    def __repr__(self):\n        raise RuntimeError('no')\n\nA()\n"
    outcome = local.run({"code": code, "eval_last_expr": True})
    assert (outcome.extra["error_type"], outcome.extra["error_line"]) == ("RuntimeError", 3)
    assert outcome.extra["result"] is None


def test_error_inside_an_awaited_coroutine(local: Local) -> None:
    """With top-level await, asyncio's and the wrapper's frames are hidden alike."""
    code = "import asyncio\nasync def f():\n    raise ValueError('x')\n\nawait f()\n"
    outcome = local.run({"code": code})
    assert (outcome.extra["error_type"], outcome.extra["error_line"]) == ("ValueError", 3)
    frames = [line for line in outcome.stderr.splitlines() if line.startswith("  File ")]
    assert len(frames) == 2
    assert all("main.py" in frame for frame in frames)


def test_chained_exceptions_keep_their_context(local: Local) -> None:
    """`raise ... from ...` prints both tracebacks, as Python does."""
    code = (
        "try:\n    1 / 0\nexcept ZeroDivisionError as exc:\n    raise ValueError('bad') from exc\n"
    )
    outcome = local.run({"code": code})
    assert (outcome.extra["error_type"], outcome.extra["error_line"]) == ("ValueError", 4)
    assert relative(outcome, local) == local.direct({"main.py": code})


def test_user_stderr_is_kept_around_the_report(local: Local) -> None:
    """The program's own stderr stays intact, even without a trailing newline."""
    code = "import sys\nsys.stderr.write('warn: a\\nwarn: b')\n"
    outcome = local.run({"code": code})
    assert outcome.stderr == "warn: a\nwarn: b"


@pytest.mark.parametrize("python", OTHER_VERSIONS)
def test_wrapper_runs_on_other_versions(local: Local, python: str) -> None:
    """The wrapper works on 3.10, 3.12 and 3.13 too: results and error fields."""
    ok = local.run({"code": "x = 5\nx * 2", "eval_last_expr": True}, python=python)
    assert (ok.exit_code, ok.extra["result"]) == (0, "10"), ok.stderr
    code = "def f():\n    return 1 / 0\n\nf()\n"
    failed = local.run({"code": code}, python=python)
    assert (failed.extra["error_type"], failed.extra["error_line"]) == ("ZeroDivisionError", 2)
    assert ".pyexec" not in failed.stderr
    awaited = local.run(
        {"code": "import asyncio\nawait asyncio.sleep(0, 7)", "eval_last_expr": True}, python=python
    )
    assert awaited.extra["result"] == "7", awaited.stderr


# --- the report channel and the traceback parser ------------------------------------------


def test_os_exit_falls_back_to_the_printed_traceback(local: Local) -> None:
    """A program that prints a traceback and leaves through os._exit still gets error fields."""
    code = textwrap.dedent(
        """\
        import os, traceback
        try:
            {}["k"]
        except KeyError:
            traceback.print_exc()
            os._exit(4)
        """
    )
    outcome = local.run({"code": code, "eval_last_expr": True})
    assert outcome.exit_code == 4
    assert (outcome.extra["error_type"], outcome.extra["error_line"]) == ("KeyError", 3)


def test_split_report_takes_the_last_report() -> None:
    """The last report line is taken out; the text around it is kept as it was."""
    first = f"{REPORT_MARK}{{'result': 'x'}}"
    stderr = f"a\n\n{first}\nb\n{REPORT_MARK}{{'result': '1', 'error_line': True}}\nc"
    rest, report = split_report(stderr)
    assert report == {"result": "1", "error_type": None, "error_line": None}
    assert rest == f"a\n\n{first}\nbc"


def test_garbled_report_is_ignored() -> None:
    """A report that is not a literal dict leaves stderr as it was."""
    stderr = f"x\n{REPORT_MARK}__import__('os')\n"
    assert split_report(stderr) == (stderr, None)


def test_parse_traceback_finds_type_and_innermost_entrypoint_line() -> None:
    """From a printed traceback: the exception type and the deepest line of the first file."""
    stderr = textwrap.dedent(
        """\
        Traceback (most recent call last):
          File "/work/main.py", line 7, in <module>
            run()
          File "/work/main.py", line 4, in run
            helper.go()
          File "/work/helper.py", line 2, in go
            raise errors.Custom("x: y")
        errors.Custom: x: y
        """
    )
    assert parse_traceback(stderr) == ("Custom", 4)


def test_parse_traceback_of_a_syntax_error() -> None:
    """A syntax error's header line counts as its line."""
    stderr = (
        "  File \"/work/main.py\", line 2\n    if True\n           ^\nSyntaxError: expected ':'\n"
    )
    assert parse_traceback(stderr) == ("SyntaxError", 2)


def test_parse_traceback_without_a_traceback() -> None:
    """Plain stderr yields no error fields."""
    assert parse_traceback("just a warning\n") == (None, None)


def test_finish_outcome_falls_back_to_the_traceback_text() -> None:
    """Without a report, a failing run's traceback is parsed."""
    stderr = (
        "Traceback (most recent call last):\n"
        '  File "/work/main.py", line 3, in <module>\n'
        "OSError: x\n"
    )
    outcome = finish_outcome(RunOutcome(reason=Reason.EXITED, exit_code=1, stderr=stderr))
    assert outcome.extra == {"result": None, "error_type": "OSError", "error_line": 3}
    assert outcome.stderr == stderr


def test_finish_outcome_leaves_timeouts_without_error_fields() -> None:
    """A run that did not exit by itself gets no error_type."""
    outcome = finish_outcome(RunOutcome(reason=Reason.TIMEOUT, stderr="Traceback...\nX: y\n"))
    assert outcome.extra == {"result": None, "error_type": None, "error_line": None}


def stored_request(entrypoint: str) -> ExecutionRequest:
    return parse_request({"entrypoint": entrypoint}, Settings())


def eval_record(stderr: str, **fields: Any) -> Execution:
    record = Execution(execution_id=new_execution_id(), request=stored_request(WRAPPER_PATH))
    outcome = RunOutcome(reason=Reason.EXITED, exit_code=0, stderr=stderr)
    return attrs.evolve(record.finished(outcome), **fields)


def test_finish_record_applies_a_report_left_in_a_stored_record() -> None:
    """A record finished without postprocess (Nomad task, restart) is fixed from stderr alone."""
    record = eval_record(f"warn\n{REPORT_MARK}{{'result': '4'}}\n")
    finished = finish_record(record)
    assert (finished.stderr, finished.result) == ("warn", "4")
    assert finish_record(finished) == finished


def test_finish_record_leaves_other_records_alone() -> None:
    """Records of the tar API, or not yet terminal, are returned unchanged."""
    tar_run = attrs.evolve(eval_record(f"\n{REPORT_MARK}{{}}\n"), request=stored_request("x.py"))
    assert finish_record(tar_run) is tar_run
    running = Execution(execution_id=new_execution_id(), request=stored_request(WRAPPER_PATH))
    assert finish_record(running) is running
