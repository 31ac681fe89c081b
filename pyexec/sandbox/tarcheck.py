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

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def member_kind(member: "Any") -> str:
    """The kind of a ``tarfile.TarInfo`` (duck-typed: this module imports nothing)."""
    if member.isreg():  # includes contiguous and sparse files
        return FILE
    if member.isdir():
        return DIR
    if member.issym():
        return SYMLINK
    if member.islnk():
        return HARDLINK
    return SPECIAL  # character/block devices, fifos, anything else


class TarProblem(Exception):
    """A member breaks a rule; ``code`` is the stable error code the API reports."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


#: Linux's PATH_MAX and NAME_MAX: longer names cannot be created under /work anyway,
#: and capping them keeps the checker's memory and time linear in the archive.
MAX_NAME = 4096
MAX_COMPONENT = 255
#: Distinct directories (named, or implied by deeper members) allowed per allowed entry.
DIRS_PER_ENTRY = 8


def _parts(name: str) -> list[str]:
    return [part for part in name.split("/") if part not in ("", ".")]


def _check_length(name: str, what: str) -> None:
    data = name.encode("utf-8", "surrogateescape")
    if len(data) > MAX_NAME or any(len(part) > MAX_COMPONENT for part in data.split(b"/")):
        raise TarProblem(
            "tar_invalid",
            f"{what} {name[:64]!r}... is over {MAX_NAME} bytes or has a part over {MAX_COMPONENT}",
        )


class _Node:
    """One path the archive names or walks through, in a tree of path parts."""

    __slots__ = ("children", "kind", "symlink", "traversed_by")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        #: The kind of the member of this path, if one has been seen (``None``: implied).
        self.kind: str | None = None
        self.symlink = False
        #: The first member whose path (or link resolution) passes through this one.
        self.traversed_by: str | None = None


class TarChecker:
    """Feed it every member in archive order; it raises ``TarProblem`` at the first bad one.

    Paths live in a tree of their parts, so each member costs time and memory in
    proportion to its name, however deep it is.
    """

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries = 0
        self.total_bytes = 0
        self.kinds: dict[str, str] = {}
        # Every directory some member or link resolution passes *through* is marked in
        # this tree; none of those may be a symlink.
        self._root = _Node()
        self._dirs = 0

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
        _check_length(name, "member name")
        path = self._path(name)
        if kind == SPECIAL:
            raise TarProblem(
                "tar_special_file", f"{name!r} is a device, fifo or other special file"
            )
        if not path:
            if kind != DIR:
                raise TarProblem("tar_invalid", f"member {name!r} has no file name")
            return None
        parts = path.split("/")
        nodes = self._traverse(parts[:-1], name)
        if kind == SYMLINK:
            _check_length(linkname, "symlink target")
            self._symlink(parts, list(nodes), name, linkname)
        elif kind == HARDLINK:
            _check_length(linkname, "hardlink target")
            self._hardlink(name, linkname)
        self._claim(nodes, parts, name, kind)
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

    def _child(self, parent: _Node, part: str) -> _Node:
        node = parent.children.get(part)
        if node is None:
            self._dirs += 1
            if self._dirs > DIRS_PER_ENTRY * self.max_entries:
                raise TarProblem(
                    "tar_too_many_entries",
                    f"the archive's paths name more than {DIRS_PER_ENTRY * self.max_entries} "
                    "directories",
                )
            node = parent.children[part] = _Node()
        return node

    def _enter(self, nodes: list[_Node], here: list[str], part: str, name: str) -> None:
        """Walk from ``nodes[-1]`` (the path ``here``) into ``part`` on behalf of ``name``."""
        node = self._child(nodes[-1], part)
        here.append(part)
        if node.symlink:
            prefix = "/".join(here)
            raise TarProblem("tar_link_escape", f"{name!r} goes through the symlink {prefix!r}")
        if node.traversed_by is None:
            node.traversed_by = name
        nodes.append(node)

    def _traverse(self, dirs: list[str], name: str) -> list[_Node]:
        """Mark ``dirs`` (a path as parts) as walked through on behalf of ``name``; returns
        the nodes from the root down to the last of them."""
        nodes: list[_Node] = [self._root]
        here: list[str] = []
        for part in dirs:
            self._enter(nodes, here, part, name)
        return nodes

    def _claim(self, nodes: list[_Node], parts: list[str], name: str, kind: str) -> None:
        """Record ``name``'s kind at its path; one path cannot be a directory and a file.

        Unpacking ``a`` (a file) and ``a/b``, or a directory and a file both named ``a``,
        cannot succeed, and a file over an earlier link of its name would be written
        through the link, and a hard link cannot be made over an existing name: refused
        here, before anything is stored or unpacked. (A symlink may replace a file or a
        link: unpacking removes what was there.)
        """
        for depth, parent in enumerate(nodes[1:], start=1):
            if parent.kind not in (None, DIR, SYMLINK):  # a symlink is a link escape
                prefix = "/".join(parts[:depth])
                raise TarProblem(
                    "tar_name_clash",
                    f"{name!r} needs {prefix!r} to be a directory, but it is a {parent.kind}",
                )
        node = self._child(nodes[-1], parts[-1])
        is_dir = kind == DIR
        was_dir = node.kind == DIR or (node.kind is None and bool(node.children))
        if (node.kind is not None or node.children) and is_dir != was_dir:
            raise TarProblem(
                "tar_name_clash",
                f"{name!r} is a {kind}, but the archive also has {'/'.join(parts)!r} as a "
                f"{'directory' if was_dir else node.kind}",
            )
        if (node.kind in (SYMLINK, HARDLINK) and kind != SYMLINK) or (
            kind == HARDLINK and node.kind is not None
        ):
            # Unpacking would write through the earlier link (or into its shared inode),
            # or could not link over what is there.
            raise TarProblem(
                "tar_name_clash",
                f"{name!r} is a {kind}, but the archive already has {'/'.join(parts)!r} as a "
                f"{node.kind}",
            )
        node.kind = kind

    def _symlink(self, parts: list[str], nodes: list[_Node], name: str, target: str) -> None:
        node = self._child(nodes[-1], parts[-1])
        if node.traversed_by is not None:
            path = "/".join(parts)
            raise TarProblem(
                "tar_link_escape", f"{node.traversed_by!r} goes through the symlink {path!r}"
            )
        if not target or target.startswith("/"):
            raise TarProblem("tar_link_escape", f"symlink {name!r} points to {target!r}")
        # Resolve the target lexically from the link's own directory. Each directory the
        # walk enters must be a real one: '..' after a symlink would climb from wherever
        # that symlink leads, so walking through one is refused.
        here = parts[:-1]
        steps = target.split("/")
        for part in steps[:-1]:
            if part in ("", "."):
                continue
            if part == "..":
                if not here:
                    raise TarProblem("tar_link_escape", f"symlink {name!r} leaves the archive")
                here.pop()
                nodes.pop()
            else:
                self._enter(nodes, here, part, name)
        if steps[-1] == ".." and not here:
            raise TarProblem("tar_link_escape", f"symlink {name!r} leaves the archive")
        node.symlink = True

    def _hardlink(self, name: str, target: str) -> None:
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
