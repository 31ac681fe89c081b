"""The files artifact tests make: a PNG drawn with the standard library, and a CSV."""

from __future__ import annotations

__all__ = ["CSV", "PNG_PROGRAM", "png_bytes"]

CSV = "x,y\n1,2\n3,4\n"

#: A program that writes ``out/plot.png`` (zlib + struct only), ``results/2024/table.csv``
#: and ``scratch.log`` (which no test asks for).
PNG_PROGRAM = f"""
import os, struct, zlib

def chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

def png(width, height):
    raw = b"".join(
        b"\\x00" + b"".join(bytes((x * 8 % 256, y * 8 % 256, 128)) for x in range(width))
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))

os.makedirs("out", exist_ok=True)
os.makedirs("results/2024", exist_ok=True)
with open("out/plot.png", "wb") as fh:
    fh.write(png(32, 24))
with open("results/2024/table.csv", "w") as fh:
    fh.write({CSV!r})
with open("scratch.log", "w") as fh:
    fh.write("not asked for")
print("drew")
"""


def png_bytes() -> bytes:
    """What ``PNG_PROGRAM`` writes to ``out/plot.png``."""
    namespace: dict[str, object] = {}
    source = PNG_PROGRAM.split("os.makedirs", 1)[0]
    exec(compile(source, "png", "exec"), namespace)  # noqa: S102 - the test's own program
    draw = namespace["png"]
    assert callable(draw)
    data = draw(32, 24)
    assert isinstance(data, bytes)
    return data
