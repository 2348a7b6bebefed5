"""Command-line overrides for the UPPER_CASE constants at the top of each script.

`--max_length=1024` or `--max_length 1024` overrides `MAX_LENGTH`; the value is parsed to the type of
the default. Unknown names and bad values stop the script, every problem on its own line (an unknown name
with a "did you mean" suggestion); `-h`/`--help` prints every setting with its default and its comment.
"""
import ast
import difflib
import io
import json
import sys
import tokenize
from pathlib import Path
from types import SimpleNamespace

from medsft.console import display_width, pad
from medsft.errors import UserError

_SIMPLE = (bool, int, float, str, list, tuple, type(None))


class Settings(SimpleNamespace):
    """The resolved settings of one run; attributes keep the constants' UPPER_CASE names."""

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self._items()}

    def _items(self):
        return [(k, v) for k, v in vars(self).items() if not k.startswith("_")]

    def save(self, directory) -> Path:
        path = Path(directory) / "settings.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return path

    def print(self, title: str = "settings") -> None:
        """One line per setting; after use_run_settings, each ends with where its value came from."""
        width = max(len(k) for k, _ in self._items())
        origins = getattr(self, "_origins", None)
        print(f"---- {title} ----")
        for key, value in self._items():
            line = f"{key.lower():<{width}} = {value!r}"
            print(f"{line}  ({origins[key]})" if origins else line)
        print("-" * (len(title) + 10), flush=True)


def read_run_settings(folder) -> dict:
    """The settings.json a run saved in `folder` (an adapter, a model folder, an OUTPUT_DIR), or {} if none.

    best/ holds no settings.json of its own: an adapter folder without one reads its OUTPUT_DIR's.
    """
    folder = Path(folder)
    if not (folder / "settings.json").is_file() and (folder / "adapter_config.json").is_file():
        folder = folder.parent
    try:
        saved = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


# what every script that loads a trained model takes from the run that trained it
RUN_SETTINGS = ("MODEL_PATH", "DATA_DIR", "SYSTEM_PROMPT")
# only where MAX_LENGTH means training's length (evaluate.py, merge_lora.py, the benchmark), not a chat window
TRAINING_LENGTH = ("MAX_LENGTH", "LONG_EXAMPLES")


def use_run_settings(cfg: Settings, training_length: bool = False, also=(), folder=None) -> dict:
    """Take RUN_SETTINGS (and TRAINING_LENGTH, and `also`) from the settings.json of the run that made the model,
    unless given on the command line.

    The run is ADAPTER_PATH's (a run's final/ or best/) or, with no adapter, MODEL_PATH's (a merged folder or
    train.py's final/); a model folder's own MODEL_PATH is never taken, since that folder is the model. A script
    that names the trained folder otherwise passes it as `folder` (benchmark.py's FINETUNED_PATH, compared with
    its base): its run's MODEL_PATH is then taken either way. Names the script has no constant for are skipped.
    Each value's origin is kept for cfg.print(). An explicit MODEL_PATH of another shape than an adapter's base
    is refused here, before anything loads. Returns the run's settings ({} when there is no run to read).
    """
    names = RUN_SETTINGS + (TRAINING_LENGTH if training_length else ()) + tuple(also)
    given = getattr(cfg, "_given", set())
    if folder is None:
        adapter = getattr(cfg, "ADAPTER_PATH", "")
        model = getattr(cfg, "MODEL_PATH", "")
        folder, take_base = adapter or (model if Path(model).is_dir() else ""), bool(adapter)
    else:
        adapter = folder if (Path(folder) / "adapter_config.json").is_file() else ""
        take_base = True
    run = read_run_settings(folder) if folder else {}
    taken = [n for n in names if hasattr(cfg, n) and n in run and n not in given and (take_base or n != "MODEL_PATH")]
    for name in taken:
        setattr(cfg, name, tuple(run[name]) if isinstance(getattr(cfg, name), tuple) else run[name])
    cfg._origins = {k: "command line" if k in given else "from the run" if k in taken else "default"
                    for k, _ in cfg._items()}
    if adapter and "MODEL_PATH" in given and run.get("MODEL_PATH") and run["MODEL_PATH"] != cfg.MODEL_PATH:
        from medsft.assistant import check_base_shape

        check_base_shape(cfg.MODEL_PATH, adapter, run["MODEL_PATH"])
    return run


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
    values, problems, unknown, bare, given = dict(defaults), [], [], [], set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in aliases:
            arg = "--" + aliases[arg]
        if not arg.startswith("--") and arg != "-h":
            bare.append(arg)
            continue
        if arg in ("-h", "--help"):
            print(help_text(namespace, defaults, aliases))
            raise SystemExit(0)
        name, eq, text = arg[2:].partition("=")
        key = name.replace("-", "_").upper()
        if key not in defaults:
            unknown.append(_unknown(name, defaults))
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
            given.add(key)
        except ValueError as e:
            problems.append(str(e))
    if bare:
        if positional and positional.upper() in defaults:
            values[positional.upper()] = type(defaults[positional.upper()])(bare)
            given.add(positional.upper())
        else:
            problems.append(f"unexpected argument(s): {' '.join(bare)} (settings are given as --name=value)")
    problems += unknown  # last, so the suggestion is the last line the user sees
    if problems:
        problems[-1] += " (--help lists every setting)"
        raise UserError("\n".join(f"error: {p}" for p in problems))
    settings = Settings(**values)
    settings._given = given
    return settings


def _unknown(name: str, defaults: dict) -> str:
    names = [k.lower() for k in defaults]
    close = difflib.get_close_matches(name.replace("-", "_").lower(), names, n=1, cutoff=0.6)
    return f"unknown setting --{name}" + (f"; did you mean --{close[0]}?" if close else "")


def help_text(namespace: dict, defaults: dict, aliases: dict) -> str:
    """The script's first docstring line, then every setting with its default and its comment, by group."""
    script = namespace.get("__file__")
    doc = (namespace.get("__doc__") or "").strip().splitlines()
    lines = [f"usage: python {Path(script).name if script else 'SCRIPT'} [--name=value ...]"]
    if doc:
        lines += ["", doc[0]]
    comments, groups = _constant_comments(script)
    options = {k: f"--{k.lower()}={v!r}" for k, v in defaults.items()}
    width = min(max((display_width(o) for o in options.values()), default=0), 36)
    for key, option in options.items():
        if key in groups:
            lines += ["", groups[key]]
        text = comments.get(key) or [""]
        if display_width(option) > width:  # a long default gets its own line, the comment below it
            lines.append(f"  {option}")
            text = text if text != [""] else []
        else:
            lines.append(f"  {pad(option, width)}  {text[0]}".rstrip())
            text = text[1:]
        lines += [f"  {'':<{width}}  {more}" for more in text]
    if aliases:
        lines += ["", "short forms: " + ", ".join(f"{a} = --{n}" for a, n in aliases.items())]
    return "\n".join(lines)


def _constant_comments(script) -> tuple[dict, dict]:
    """({NAME: [comment lines]}, {NAME: group heading}) from a script's constants block.

    The comment after `NAME = value` documents NAME, and so do comment-only lines indented under it; a
    comment alone at column 0 (`# model`) heads the group of the constants below it.
    """
    comments, groups = {}, {}
    if not script or not Path(script).is_file():
        return comments, groups
    source = Path(script).read_text(encoding="utf-8")
    try:
        spans = {(node.lineno, node.end_lineno): node.targets[0].id for node in ast.parse(source).body
                 if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                 and node.targets[0].id.isupper()}
        notes = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    except (SyntaxError, tokenize.TokenError):
        return comments, groups
    last, heading = None, None
    for note in notes:
        (row, col), text = note.start, note.string.lstrip("#").strip()
        owner = next((name for (first, end), name in spans.items() if first <= row <= end), None)
        if owner:
            last = owner
            comments.setdefault(owner, []).append(text)
            if heading:
                groups.setdefault(owner, heading)
                heading = None
        elif col == 0:
            last = None
            heading = text if text and not set(text) <= {"-"} else heading
        elif last and text:
            comments[last].append(text)  # an indented comment line continues the one above
    return comments, groups


def check_settings(problems: list[str]) -> None:
    """Stop with every problem at once, before anything slow (a model load) starts."""
    problems = [p for p in problems if p]
    if problems:
        raise UserError("error: the settings have problems:\n" + "\n".join(f"  - {p}" for p in problems))
