"""Strict option parsing from ``trtllm_flags.json`` (argparse for trtllm-build, click rules for
trtllm-bench): unknown options, bad choices, bad types or missing paths exit with status 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path

FLAGS = json.loads((Path(__file__).resolve().parent / "trtllm_flags.json").read_text())
TYPES = {"int": int, "float": float, "str": str, "path": str}


def fail(tool: str, message: str) -> None:
    print(f"usage: {tool} [OPTIONS]\n{tool}: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse(tool: str, spec: dict[str, dict], argv: list[str], *, stop_at: set[str] = frozenset()) -> tuple[dict, list]:
    """Options of ``spec`` from ``argv`` until a word of ``stop_at``; returns (values, rest)."""
    names = {alias: name for name, s in spec.items() for alias in [name, *s.get("aliases", [])]}
    values: dict[str, object] = {}
    i = 0
    rest: list[str] = []
    while i < len(argv):
        word = argv[i]
        if word in stop_at:
            rest = argv[i:]
            break
        key, _, inline = word.partition("=")
        if key not in names:
            fail(tool, f"unrecognized arguments: {word}")
        name = names[key]
        s = spec[name]
        if s.get("action") == "store_true" or s.get("is_flag"):
            values[name] = True
            i += 1
            continue
        if inline:
            raw, i = [inline], i + 1
        elif s.get("nargs") == "+":
            raw = []
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                raw.append(argv[i])
                i += 1
        else:
            if i + 1 >= len(argv):
                fail(tool, f"argument {name}: expected one argument")
            raw, i = [argv[i + 1]], i + 2
        converted = []
        for item in raw:
            try:
                converted.append(TYPES[s.get("type", "str")](item))
            except ValueError:
                fail(tool, f"argument {name}: invalid {s['type']} value: {item!r}")
            if "choices" in s and item not in s["choices"]:
                fail(tool, f"argument {name}: invalid choice: {item!r} (choose from {', '.join(s['choices'])})")
            if s.get("exists") and not Path(item).exists():
                fail(tool, f"Invalid value for '{name}': Path '{item}' does not exist.")
        values[name] = converted if s.get("nargs") == "+" else converted[0]
    groups: dict[str, list[str]] = {}
    for name in values:
        if group := spec[name].get("exclusive_group"):
            groups.setdefault(group, []).append(name)
    for group, used in groups.items():
        if len(used) > 1:
            fail(tool, f"Mutually exclusive options {' and '.join(used)} used together ({group})")
    for name, s in spec.items():
        if s.get("required") and name not in values:
            fail(tool, f"Missing option '{name}'.")
    return values, rest


def value(values: dict, spec: dict, name: str):
    return values.get(name, spec[name].get("default"))
