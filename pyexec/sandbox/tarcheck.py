"""The rules an uploaded tar must pass, member by member (standard library only).

The service applies them before it stores an archive (``pyexec.tarsafe``) and the
bootstrap applies them again while it extracts inside the container, so this
module runs on the host and, appended to the bootstrap's source, in any image's
Python 3.8+. Keep it free of imports (and of ``from __future__``: the bootstrap's
own, at the top of the combined source, covers it there).

Every check is order-independent: a symlink that appears after the members that
would be written through it is caught as surely as one that appears before.
"""

FILE = "file"
DIR = "dir"
SYMLINK = "symlink"
HARDLINK = "hardlink"
SPECIAL = "special"


class TarProblem(Exception):
    """A member breaks a rule; ``code`` is the stable error code the API reports."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _parts(name: str) -> list[str]:
    return [part for part in name.split("/") if part not in ("", ".")]


class TarChecker:
    """Feed it every member in archive order; it raises ``TarProblem`` at the first bad one."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries = 0
        self.total_bytes = 0
        self.kinds: dict[str, str] = {}
        self._symlinks: set[str] = set()
        # Every directory some member or link resolution passes *through*; none may be a symlink.
        self._traversed: dict[str, str] = {}

    def add(self, name: str, kind: str, size: int, linkname: str = "") -> str | None:
        """Check one member; returns its normalised path (``None`` for the root itself)."""
        self.entries += 1
        if self.entries > self.max_entries:
            raise TarProblem(
                "tar_too_many_entries", f"the archive has more than {self.max_entries} entries"
            )
        if kind == FILE:
            self.total_bytes += max(0, size)
            if self.total_bytes > self.max_bytes:
                raise TarProblem(
                    "tar_too_much_data",
                    f"the archive's members declare more than {self.max_bytes} bytes",
                )
        path = self._path(name)
        if kind == SPECIAL:
            raise TarProblem(
                "tar_special_file", f"{name!r} is a device, fifo or other special file"
            )
        if not path:
            if kind != DIR:
                raise TarProblem("tar_invalid", f"member {name!r} has no file name")
            return None
        self._traverse(path.split("/")[:-1], name)
        if kind == SYMLINK:
            self._symlink(path, name, linkname)
        elif kind == HARDLINK:
            self._hardlink(path, name, linkname)
        self.kinds[path] = kind
        return path

    def normalize(self, name: str) -> str:
        """``name`` as the archive-relative path it denotes (after the checks in ``add``)."""
        return "/".join(_parts(name))

    def _path(self, name: str) -> str:
        if name.startswith("/"):
            raise TarProblem("tar_absolute_path", f"{name!r} is an absolute path")
        parts = _parts(name)
        if ".." in parts:
            raise TarProblem("tar_path_traversal", f"{name!r} contains '..'")
        return "/".join(parts)

    def _traverse(self, dirs: list[str], name: str) -> None:
        """Record that ``dirs`` (a path as parts) is walked through on behalf of ``name``."""
        for depth in range(1, len(dirs) + 1):
            prefix = "/".join(dirs[:depth])
            if prefix in self._symlinks:
                raise TarProblem("tar_link_escape", f"{name!r} goes through the symlink {prefix!r}")
            self._traversed.setdefault(prefix, name)

    def _symlink(self, path: str, name: str, target: str) -> None:
        if path in self._traversed:
            raise TarProblem(
                "tar_link_escape",
                f"{self._traversed[path]!r} goes through the symlink {path!r}",
            )
        if not target or target.startswith("/"):
            raise TarProblem("tar_link_escape", f"symlink {name!r} points to {target!r}")
        # Resolve the target lexically from the link's own directory. Each directory the
        # walk enters must be a real one: '..' after a symlink would climb from wherever
        # that symlink leads, so walking through one is refused.
        here = path.split("/")[:-1]
        walked: list[str] = []
        for part in target.split("/")[:-1]:
            if part in ("", "."):
                continue
            if part == "..":
                if not here:
                    raise TarProblem("tar_link_escape", f"symlink {name!r} leaves the archive")
                here.pop()
            else:
                here.append(part)
                walked.append("/".join(here))
        last = target.split("/")[-1]
        if last == ".." and not here:
            raise TarProblem("tar_link_escape", f"symlink {name!r} leaves the archive")
        for prefix in walked:
            self._traverse(prefix.split("/"), name)
        self._symlinks.add(path)

    def _hardlink(self, path: str, name: str, target: str) -> None:
        if target.startswith("/"):
            raise TarProblem("tar_link_escape", f"hardlink {name!r} points to {target!r}")
        parts = _parts(target)
        if ".." in parts or not parts:
            raise TarProblem("tar_link_escape", f"hardlink {name!r} points to {target!r}")
        resolved = "/".join(parts)
        # Only to a regular file seen before: a hard link to a symlink would re-anchor
        # the symlink's relative target somewhere else.
        if self.kinds.get(resolved) != FILE:
            raise TarProblem(
                "tar_link_escape",
                f"hardlink {name!r} must point to an earlier regular file, not {target!r}",
            )
