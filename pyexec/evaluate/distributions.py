"""From import names to the distributions that provide them, merged with requirements_txt.

Most distributions install a module of their own name (pip also folds case and
``-``/``_``/``.``), so only the names that differ are listed. The longest
dotted prefix wins (``google.protobuf`` → ``protobuf``). Some import names
are never installed: a bare namespace (``google``, ``azure``) names no single
distribution, and a module that left the standard library without a
replacement of the same name (``imp``) would install something unrelated, if
anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = [
    "DISTRIBUTIONS",
    "NEVER_INSTALL",
    "distribution_for",
    "distributions_for",
    "merge_requirements",
    "normalize",
    "requirement_names",
]

#: Import name (dotted where the top level is a shared namespace) → distribution name.
DISTRIBUTIONS: Mapping[str, str] = {
    "Bio": "biopython",
    "Crypto": "pycryptodome",
    "Cryptodome": "pycryptodomex",
    "MySQLdb": "mysqlclient",
    "OpenGL": "PyOpenGL",
    "OpenSSL": "pyOpenSSL",
    "PIL": "Pillow",
    "Xlib": "python-xlib",
    "absl": "absl-py",
    "asynchat": "pyasynchat",  # left the standard library in 3.12
    "asyncore": "pyasyncore",  # left the standard library in 3.12
    "attr": "attrs",
    "azure.identity": "azure-identity",
    "azure.storage.blob": "azure-storage-blob",
    "bs4": "beautifulsoup4",
    "bson": "pymongo",
    "cairo": "pycairo",
    "cgi": "legacy-cgi",  # left the standard library in 3.13
    "cgitb": "legacy-cgi",
    "cv2": "opencv-python",
    "dateutil": "python-dateutil",
    "discord": "discord.py",
    "distutils": "setuptools",  # left the standard library in 3.12
    "dns": "dnspython",
    "docx": "python-docx",
    "dotenv": "python-dotenv",
    "faiss": "faiss-cpu",
    "fitz": "PyMuPDF",
    "git": "GitPython",
    "github": "PyGithub",
    "google.auth": "google-auth",
    "google.cloud.bigquery": "google-cloud-bigquery",
    "google.cloud.storage": "google-cloud-storage",
    "google.genai": "google-genai",
    "google.generativeai": "google-generativeai",
    "google.protobuf": "protobuf",
    "googleapiclient": "google-api-python-client",
    "grpc": "grpcio",
    "jose": "python-jose",
    "jwt": "PyJWT",
    "kafka": "kafka-python",
    "ldap": "python-ldap",
    "magic": "python-magic",
    "markdown_it": "markdown-it-py",
    "mpl_toolkits": "matplotlib",
    "multipart": "python-multipart",
    "nacl": "PyNaCl",
    "pdfminer": "pdfminer.six",
    "pkg_resources": "setuptools",
    "pptx": "python-pptx",
    "psycopg2": "psycopg2-binary",  # the source distribution needs pg_config to build
    "ruamel.yaml": "ruamel.yaml",
    "serial": "pyserial",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "slugify": "python-slugify",
    "socks": "PySocks",
    "speech_recognition": "SpeechRecognition",
    "telegram": "python-telegram-bot",
    "umap": "umap-learn",
    "usb": "pyusb",
    "websocket": "websocket-client",
    "yaml": "PyYAML",
    "zmq": "pyzmq",
}

#: Import names eval never installs (see the module docstring).
NEVER_INSTALL = frozenset({"azure", "google", "imp", "ruamel", "tomllib"})

#: Distributions that provide the same import as the mapped one; any of them in
#: requirements_txt means the import is taken care of.
ALTERNATIVES: Mapping[str, frozenset[str]] = {
    "opencv-python": frozenset(
        {"opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"}
    ),
    "psycopg2-binary": frozenset({"psycopg2"}),
    "pycryptodome": frozenset({"pycrypto"}),
    "pyjwt": frozenset({"jwt"}),
    "python-magic": frozenset({"python-magic-bin"}),
    "faiss-cpu": frozenset({"faiss-gpu"}),
}

_NAME = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")
_EGG = re.compile(r"#egg=([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    """A distribution name as pip compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_for(module: str) -> str | None:
    """The distribution to install for dotted ``module``; ``None`` if none should be."""
    parts = module.split(".")
    for size in range(len(parts), 0, -1):
        prefix = ".".join(parts[:size])
        if prefix in DISTRIBUTIONS:
            return DISTRIBUTIONS[prefix]
    top = parts[0]
    if top in NEVER_INSTALL:
        return None
    return top


def distributions_for(modules: Iterable[str]) -> tuple[str, ...]:
    """Distinct distributions for ``modules``, sorted, one per normalized name."""
    found: dict[str, str] = {}
    for module in modules:
        dist = distribution_for(module)
        if dist is not None:
            found.setdefault(normalize(dist), dist)
    return tuple(found[key] for key in sorted(found))


def requirement_names(requirements_txt: str) -> frozenset[str]:
    """Normalized distribution names a requirements file names (options and blanks skipped)."""
    names = set()
    for raw in requirements_txt.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if egg := _EGG.search(line):
            names.add(normalize(egg[1]))
        elif (
            not line.startswith("-")
            and "://" not in line.split("@", 1)[0]
            and (match := _NAME.match(line))
        ):
            names.add(normalize(match[1]))
    return frozenset(names)


def merge_requirements(explicit: str, detected: Iterable[str]) -> tuple[str, tuple[str, ...]]:
    """``explicit`` plus the ``detected`` distributions it does not name already.

    Returns the merged requirements text and the distributions that were added.
    """
    named = requirement_names(explicit)
    added = tuple(
        dist
        for dist in detected
        if normalize(dist) not in named
        and not (ALTERNATIVES.get(normalize(dist), frozenset()) & named)
    )
    if not added:
        return explicit, ()
    head = explicit.rstrip("\n")
    lines = ([head] if head.strip() else []) + list(added)
    return "\n".join(lines) + "\n", added
