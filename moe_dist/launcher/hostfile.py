"""MPI/DeepSpeed-style hostfiles: ``HOST slots=N`` lines, ``#`` comments."""

from __future__ import annotations

import re

HOST = re.compile(r"^[A-Za-z0-9_.:\[\]-]+$")  # DNS names, IPv4, bracketed IPv6


def parse_hostfile(text: str) -> list[tuple[str, int | None]]:
    """``host [slots=N]`` lines (MPI/DeepSpeed style; ``#`` comments); raises ValueError."""
    out: list[tuple[str, int | None]] = []
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)(?:\s+slots\s*=\s*(\d+))?(?:\s+max_slots\s*=\s*\d+)?", line)
        if not m or not HOST.match(m.group(1)):
            raise ValueError(f"line {i}: expected `HOST slots=N`, got {raw.strip()!r}")
        out.append((m.group(1), int(m.group(2)) if m.group(2) else None))
    if not out:
        raise ValueError("lists no hosts")
    return out
