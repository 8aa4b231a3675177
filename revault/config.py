"""TOML configuration: typed reading with one clear error per bad or unknown key.

A daemon reads its table through `ConfigTable`, which remembers what was read; `finish()`
then reports every key nobody asked for, so a typo in a config file stops the daemon at
start instead of silently falling back to a default.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Callable

MISSING: Any = object()


class ConfigError(Exception):
    """One or more problems in a config file; each line names the key."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "a list", dict: "a table",
    }.get(type(value), type(value).__name__)


class ConfigTable:
    """One TOML table. Every accessor raises ConfigError naming the full key."""

    def __init__(self, data: dict, path: str = ""):
        self._data = data
        self._path = path
        self._read: set[str] = set()
        self._children: list[ConfigTable] = []

    def key_name(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.key_name(key)}: {reason}")

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], expected: str) -> Any:
        self._read.add(key)
        if key not in self._data:
            if default is MISSING:
                raise self.error(key, "missing")
            return default
        value = self._data[key]
        # bool is an int in Python; a config saying `port = true` is a mistake.
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"expected {expected}, got a boolean")
        if not isinstance(value, kinds):
            raise self.error(key, f"expected {expected}, got {_type_name(value)}")
        return value

    def string(self, key: str, default: Any = MISSING) -> str:
        return self._get(key, default, (str,), "a string")

    def boolean(self, key: str, default: Any = MISSING) -> bool:
        return self._get(key, default, (bool,), "a boolean")

    def integer(self, key: str, *, minimum: int | None = None, maximum: int | None = None,
                default: Any = MISSING) -> int:
        value = self._get(key, default, (int,), "an integer")
        if value is None:  # TOML has no null: only a default of None gets here
            return None
        self._check_range(key, value, minimum, maximum)
        return value

    def number(self, key: str, *, minimum: float | None = None, maximum: float | None = None,
               default: Any = MISSING) -> float:
        value = self._get(key, default, (int, float), "a number")
        if value is None:  # TOML has no null: only a default of None gets here
            return None
        self._check_range(key, value, minimum, maximum)
        return float(value)

    def _check_range(self, key, value, minimum, maximum) -> None:
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum}, got {value}")

    def path(self, key: str, base: Path, default: Any = MISSING) -> Path:
        value = self.string(key, default)
        if value is None or isinstance(value, Path):
            return value
        if not value:
            raise self.error(key, "must not be empty")
        return (base / Path(value).expanduser()).resolve()

    def listen(self, key: str, default: Any = MISSING) -> tuple[str, int]:
        value = self.string(key, default)
        if value is None or isinstance(value, tuple):  # a default: off, or given parsed
            return value
        return parse_host_port(value, self.key_name(key))

    def noise_key(self, key: str, default: Any = MISSING) -> bytes:
        value = self.string(key, default)
        if isinstance(value, bytes):
            return value
        return parse_noise_key(value, self.key_name(key))

    def noise_keys(self, key: str, default: Any = MISSING) -> list[bytes]:
        values = self._get(key, default, (list,), "a list of 64-hex Noise public keys")
        keys = []
        for i, value in enumerate(values):
            name = f"{self.key_name(key)}[{i}]"
            if not isinstance(value, str):
                raise ConfigError(f"{name}: expected a string, got {_type_name(value)}")
            parsed = parse_noise_key(value, name)
            if parsed in keys:
                raise ConfigError(f"{name}: duplicate key")
            keys.append(parsed)
        return keys

    def string_list(self, key: str, default: Any = MISSING) -> list[str]:
        values = self._get(key, default, (list,), "a list of strings")
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise ConfigError(
                    f"{self.key_name(key)}[{i}]: expected a string, got {_type_name(value)}")
        return list(values)

    def table(self, key: str, default: Any = MISSING) -> ConfigTable:
        value = self._get(key, default, (dict,), "a table")
        if isinstance(value, ConfigTable):
            return value
        child = ConfigTable(value, self.key_name(key))
        self._children.append(child)
        return child

    def raw(self, key: str, default: Any = MISSING) -> Any:
        """The value as TOML gave it, for tables parsed by their own module."""
        self._read.add(key)
        if key not in self._data:
            if default is MISSING:
                raise self.error(key, "missing")
            return default
        return self._data[key]

    def unknown_keys(self) -> list[str]:
        unknown = [self.key_name(k) for k in self._data if k not in self._read]
        for child in self._children:
            unknown.extend(child.unknown_keys())
        return unknown

    def finish(self) -> None:
        unknown = self.unknown_keys()
        if unknown:
            raise ConfigError([f"{name}: unknown key" for name in unknown])


class ProblemCollector:
    """Reads keys one by one, collecting every bad one instead of stopping at the first.

    An operator fixes a config in one round trip; and a key never reached because an
    earlier one was bad is not misreported as unknown.
    """

    def __init__(self):
        self.problems: list[str] = []

    def read(self, read: Callable[..., Any], *args, **kwargs) -> Any:
        """`read(*args, **kwargs)`, or None (with the problem kept) if it raised ConfigError."""
        try:
            return read(*args, **kwargs)
        except ConfigError as e:
            self.problems.extend(e.problems)
            return None

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    def finish(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def parse_host_port(value: str, name: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"{name}: expected \"HOST:PORT\", got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name}: port must be 0..65535, got {port}")
    return host, port


def parse_noise_key(value: str, name: str) -> bytes:
    if len(value) != 64 or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise ConfigError(f"{name}: expected 64 hex characters (a Noise public key)")
    return bytes.fromhex(value)


def load_config_file(path: Path) -> ConfigTable:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return ConfigTable(data)
