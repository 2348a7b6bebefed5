"""Command-line overrides for the UPPER_CASE constants at the top of each script.

`--max_length=1024` or `--max_length 1024` overrides `MAX_LENGTH`; the value is parsed to the type of
the default. Unknown names and bad values stop the script with a message listing the valid names.
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from medsft.errors import UserError

_SIMPLE = (bool, int, float, str, list, tuple, type(None))


class Settings(SimpleNamespace):
    """The resolved settings of one run; attributes keep the constants' UPPER_CASE names."""

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()}

    def save(self, directory) -> Path:
        path = Path(directory) / "settings.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return path

    def print(self, title: str = "settings") -> None:
        width = max(len(k) for k in vars(self))
        print(f"---- {title} ----")
        for key, value in vars(self).items():
            print(f"{key.lower():<{width}} = {value!r}")
        print("-" * (len(title) + 10), flush=True)


def _parse_value(name: str, text: str, default):
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"--{name} takes true or false, not {text!r}")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--{name} takes an integer, not {text!r}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--{name} takes a number, not {text!r}") from None
    if isinstance(default, (list, tuple)):
        text = text.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                raise ValueError(f"--{name} takes a JSON list or comma-separated values, not {text!r}") from None
        else:
            items = [t.strip() for t in text.split(",") if t.strip()]
        return type(default)(items)
    if default is None:
        return None if text.strip().lower() in ("none", "null", "") else text
    return text


def parse_settings(namespace: dict, argv=None, aliases: dict | None = None, positional: str | None = None) -> Settings:
    """Build the run's settings from a script's UPPER_CASE globals and the command line.

    `aliases` maps short flags (e.g. "-q") to a setting's lower-case name; `positional`, when given, names a
    list setting that collects bare arguments (e.g. the run folders of compare.py).
    """
    defaults = {k: v for k, v in namespace.items() if k.isupper() and not k.startswith("_") and isinstance(v, _SIMPLE)}
    argv = list(sys.argv[1:] if argv is None else argv)
    aliases = aliases or {}
    values, problems, bare = dict(defaults), [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in aliases:
            arg = "--" + aliases[arg]
        if not arg.startswith("--"):
            bare.append(arg)
            continue
        name, eq, text = arg[2:].partition("=")
        if name in ("help", "h"):
            raise UserError(_usage(defaults, aliases))
        key = name.replace("-", "_").upper()
        if key not in defaults:
            problems.append(f"unknown setting --{name}")
            if not eq and i < len(argv) and not argv[i].startswith("-"):
                i += 1
            continue
        if not eq:
            if isinstance(defaults[key], bool) and (i >= len(argv) or argv[i].startswith("-")):
                text = "true"  # a bare --flag switches a bool on
            elif i < len(argv):
                text, i = argv[i], i + 1
            else:
                problems.append(f"--{name} needs a value")
                continue
        try:
            values[key] = _parse_value(name, text, defaults[key])
        except ValueError as e:
            problems.append(str(e))
    if bare:
        if positional and positional.upper() in defaults:
            values[positional.upper()] = type(defaults[positional.upper()])(bare)
        else:
            problems.append(f"unexpected argument(s): {' '.join(bare)} (settings are given as --name=value)")
    if problems:
        raise UserError("error: " + "; ".join(problems) + "\n" + _usage(defaults, aliases))
    return Settings(**values)


def _usage(defaults: dict, aliases: dict) -> str:
    lines = ["valid settings (--name=value):"]
    lines += [f"  --{k.lower()}={v!r}" for k, v in defaults.items()]
    if aliases:
        lines.append("short forms: " + ", ".join(f"{a} = --{n}" for a, n in aliases.items()))
    return "\n".join(lines)


def check_settings(problems: list[str]) -> None:
    """Stop with every problem at once, before anything slow (a model load) starts."""
    problems = [p for p in problems if p]
    if problems:
        raise UserError("error: the settings have problems:\n" + "\n".join(f"  - {p}" for p in problems))
