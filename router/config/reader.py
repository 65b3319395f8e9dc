"""Walks the TOML tree, collecting every problem with its dotted path and reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from router.config.model import Endpoint, Problem, parse_endpoint
from router.wire.jid import normalize_domain


class Reader:
    """Walks the TOML tree, collecting every problem with its dotted path."""

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self.problems: list[Problem] = []

    def problem(self, path: str, reason: str) -> None:
        self.problems.append(Problem(path, reason))

    def table(self, data: Mapping[str, Any], key: str, path: str = "") -> Mapping[str, Any]:
        value = data.get(key, {})
        where = f"{path}.{key}" if path else key
        if not isinstance(value, dict):
            self.problem(where, f"must be a table, got {kind_of(value)}")
            return {}
        return value

    def known_keys(self, data: Mapping[str, Any], path: str, allowed: set[str]) -> None:
        for key in data:
            if key not in allowed:
                where = f"{path}.{key}" if path else key
                self.problem(where, f"unknown option (known: {', '.join(sorted(allowed))})")

    def get(self, data: Mapping[str, Any], path: str, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        if key not in data:
            return default
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a TOML `true` is never a number here
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        elif float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            ok = True
        else:
            ok = isinstance(value, kinds)
        if not ok:
            self.problem(f"{path}.{key}", f"must be {' or '.join(_TYPE_NAMES[k] for k in kinds)}, got {kind_of(value)}")
            return default
        return value

    def positive(self, data, path, key, kind, default):
        value = self.get(data, path, key, kind, default)
        if value <= 0:
            self.problem(f"{path}.{key}", f"must be greater than 0, got {value}")
            return default
        return value

    def choice(self, data, path, key, choices, default, *, upper=False):
        value = self.get(data, path, key, str, default)
        folded = value.upper() if upper else value
        if folded not in choices:
            self.problem(f"{path}.{key}", f"must be one of {', '.join(choices)}, got {value!r}")
            return default
        return folded

    def domain(self, value: Any, path: str) -> str | None:
        if not isinstance(value, str):
            self.problem(path, f"must be a domain string, got {kind_of(value)}")
            return None
        try:
            return normalize_domain(value)
        except ValueError as exc:
            self.problem(path, f"{value!r}: {exc}")
            return None

    def domains(self, data, path, key, default: tuple[str, ...]) -> tuple[str, ...]:
        values = self.get(data, path, key, list, None)
        if values is None:
            return default
        found = []
        for i, value in enumerate(values):
            domain = self.domain(value, f"{path}.{key}[{i}]")
            if domain is not None and domain not in found:
                found.append(domain)
        return tuple(found)

    def pattern(self, value: Any, path: str) -> str | None:
        """An allow/deny entry: an exact domain or ``*.suffix``."""
        if isinstance(value, str) and value.startswith("*."):
            try:
                return "*." + normalize_domain(value[2:])
            except ValueError as exc:
                self.problem(path, f"{value!r}: {exc}")
                return None
        return self.domain(value, path)

    def endpoint(self, data, path, key, default: str | None) -> Endpoint | None:
        value = self.get(data, path, key, (str, bool), default)
        if value is False or value == "" or value is None:
            return None
        if value is True:
            self.problem(f"{path}.{key}", "use an address 'host:port' to enable, false to disable")
            return None
        try:
            return parse_endpoint(value, listening=True)
        except ValueError as exc:
            self.problem(f"{path}.{key}", str(exc))
            return None

    def path(self, value: Any, where: str, *, must_exist: bool = True) -> Path | None:
        if not isinstance(value, str) or not value:
            self.problem(where, f"must be a file path, got {kind_of(value)}")
            return None
        resolved = (self.base_dir / Path(value).expanduser()).resolve()
        if must_exist and not resolved.is_file():
            self.problem(where, f"file not found: {resolved}")
            return None
        return resolved


_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number", list: "a list", dict: "a table"}


def kind_of(value: Any) -> str:
    for kind, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "a list"),
        (dict, "a table"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__
