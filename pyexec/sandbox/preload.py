"""The program's own interpreter, started before its input arrives, with modules imported.

A sandbox made for a cached dependency environment (a warm pool's, ``pyexec.deps``)
starts the interpreter that will run the user's program at once, with the program's
exact environment, and imports the environment's modules in it (``numpy``, ``pandas``)
while it waits: the import is paid before the request, not during it. The bootstrap
starts it as ``python3 -c <this file> <status fd> <control fd> <stdout fd> <stderr fd>
<module>...`` with stdout and stderr on /dev/null (nothing of the import reaches the
run's output) and the run's real ones passed as descriptors.

Once the project is unpacked the bootstrap sends, on the control descriptor, a
marshalled ``(cwd, entrypoint, args)``; this process answers one byte on the status
descriptor: ``y`` and it runs the program, or ``n`` and it exits (the bootstrap then
runs the program in a fresh interpreter as usual). It says ``n`` whenever the result
could differ from a fresh interpreter's: a module failed to import, or the program's
directory holds a file or folder named like a module the import loaded (the program's
own ``numpy.py`` must win, as it would), or the entrypoint is not a plain source file
(a symlink, a directory, a zip archive). Otherwise the program runs as ``python3
<entrypoint> <args>`` would run it: the same ``sys.argv``, ``sys.orig_argv``,
``sys.path``, ``__main__`` namespace, descriptors 0-2 only, tracebacks without a frame
of this file, the same exit status. What remains visible is what the import left:
the modules in ``sys.modules``.

Standard library modules a fresh interpreter has already loaded only (``os``, ``sys``,
``marshal``): it must not add any of its own, not even ``__future__`` (its
annotations are strings, like ``collect.py``'s: the image's Python may be 3.8).
"""


def _pyexec_preload() -> None:
    import marshal
    import os
    import sys

    status, control, out, err = (int(arg) for arg in sys.argv[1:5])
    names = sys.argv[5:]
    loaded_before = set(sys.modules)
    # Nothing of the project (it may be unpacking meanwhile) during the import.
    path = list(sys.path)
    sys.path[:] = [entry for entry in path if entry]
    ok = True
    for name in names:
        try:
            __import__(name)
        except BaseException:  # noqa: BLE001 - the program then runs in a fresh interpreter
            ok = False
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001, S110 - /dev/null: nothing to keep
        pass
    sys.path[:] = path
    added = {name.partition(".")[0] for name in set(sys.modules) - loaded_before}

    message = b""
    while True:
        chunk = os.read(control, 65536)
        if not chunk:
            break
        message += chunk
    os.close(control)
    if not message:  # the bootstrap runs the program elsewhere
        os._exit(0)
    cwd, entrypoint, args = marshal.loads(message)  # noqa: S302 - from the bootstrap
    os.chdir(cwd)
    script = os.path.abspath(entrypoint)
    source = _plain_source(script) if ok else None
    ok = source is not None and not _shadowed(os.path.dirname(script), added)
    os.write(status, b"y" if ok else b"n")
    os.close(status)
    if not ok:
        os._exit(0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    _run(script, entrypoint, args, source or b"")


def _plain_source(script: str) -> "bytes | None":
    """The text ``python3 <script>`` would run as source (``None`` for a directory, a
    zip archive, a link, what cannot be read: a fresh interpreter handles those)."""
    import os

    if os.path.islink(script) or not os.path.isfile(script):
        return None
    try:
        with open(script, "rb") as fh:
            source = fh.read()
    except OSError:
        return None
    # A zip archive (its end record) runs as one, whatever its name.
    return None if b"PK\x05\x06" in source else source


def _shadowed(directory: str, modules: "set[str]") -> bool:
    """Whether the program's directory holds anything a module the import loaded is
    named like (it comes first on the program's path)."""
    import os

    try:
        entries = os.listdir(directory)
    except OSError:
        return True
    return any(entry.partition(".")[0] in modules for entry in entries)


def _run(script: str, entrypoint: str, args: "list[str]", source: bytes) -> None:
    """Run ``script`` (its text: ``source``) as the interpreter runs a script named on
    its command line."""
    import os
    import sys

    import __main__

    sys.argv[:] = [entrypoint, *args]
    if hasattr(sys, "orig_argv"):  # Python 3.10+
        sys.orig_argv[:] = [sys.executable, entrypoint, *args]
    sys.path[0] = os.path.dirname(script)
    namespace = vars(__main__)
    report = _uncaught  # the namespace is about to be emptied: these functions' globals
    builtins = namespace["__builtins__"]
    loader = sys.modules["_frozen_importlib_external"].SourceFileLoader("__main__", script)
    namespace.clear()
    namespace.update(
        __name__="__main__",
        __doc__=None,
        __package__=None,
        __loader__=loader,
        __spec__=None,
        __annotations__={},
        __builtins__=builtins,
        __file__=script,
        __cached__=None,
    )
    del builtins, loader
    try:
        code = compile(source, script, "exec", dont_inherit=True)
        del source
        exec(code, namespace)  # noqa: S102 - running the user program is the point
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - reported as the interpreter would
        report(exc)


def _uncaught(exc: BaseException) -> None:
    """Report an exception the program did not catch as the interpreter does, without
    this file's frames, and exit as it would (1; SIGINT for ``KeyboardInterrupt``)."""
    import sys

    tb = exc.__traceback__
    mine = sys._getframe().f_code.co_filename
    while tb is not None and tb.tb_frame.f_code.co_filename == mine:
        tb = tb.tb_next
    exc.__traceback__ = tb  # what the default hook prints, whatever its argument says
    sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
    sys.excepthook(type(exc), exc, tb)
    del exc, tb
    if sys.last_type is KeyboardInterrupt:
        import atexit
        import os
        import signal

        atexit._run_exitfuncs()
        sys.stdout.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    raise SystemExit(1)


_pyexec_preload()
