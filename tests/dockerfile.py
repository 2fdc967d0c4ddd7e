"""Reading container files without Docker: a small Dockerfile parser (instructions, continuation lines,
exec / JSON forms, ARG and ENV substitution) and a .dockerignore matcher following Docker's rules."""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field
from pathlib import PurePosixPath

# --- a small Dockerfile parser -----------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # everything after the keyword, continuation lines joined, without leading --flags
    flags: dict[str, str]  # leading `--name=value` options (COPY --from, HEALTHCHECK --interval, ...)
    line: int  # where it starts, 1-based

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON-array form (`["a", "b"]`), or None for the shell form."""
        if not self.args.startswith("["):
            return None
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None  # Docker, too, takes a malformed array as the shell form
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


_FLAGGED = {"ADD", "COPY", "FROM", "HEALTHCHECK", "RUN"}
_DIRECTIVE = re.compile(r"#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*$")


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, as BuildKit reads them (no heredocs: this project's Dockerfile has none)."""
    lines = text.splitlines()
    escape = "\\"
    for line in lines:  # parser directives: comments of the form `# name=value` before anything else
        directive = _DIRECTIVE.match(line)
        if not directive:
            break
        if directive.group(1).lower() == "escape":
            escape = directive.group(2)
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # blank lines and comments, also between continuation lines
        if not pending:
            start = number
        if line.rstrip().endswith(escape):
            pending.append(line.rstrip()[: -len(escape)])
            continue
        pending.append(line)
        instructions.append(_instruction("".join(pending).strip(), start))
        pending = []
    if pending:
        instructions.append(_instruction("".join(pending).strip(), start))
    return instructions


def _instruction(text: str, line: int) -> Instruction:
    keyword, _, rest = text.partition(" ")
    keyword, rest = keyword.upper(), rest.strip()
    flags: dict[str, str] = {}
    while keyword in _FLAGGED and rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        rest = rest.strip()
    return Instruction(keyword, rest, flags, line)


_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::([-+])([^}]*))?\}|(\w+))")


def substitute(text: str, variables: dict[str, str]) -> str:
    """Docker's `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR:+alt}`; unknown names are kept as written."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(4)
        if match.group(2) == "-":
            return variables.get(name) or match.group(3)
        if match.group(2) == "+":
            return match.group(3) if variables.get(name) else ""
        return variables.get(name, match.group(0))

    return _VARIABLE.sub(replace, text)


def key_values(args: str) -> dict[str, str]:
    """ENV / ARG / LABEL arguments: `k=v k2="v 2"`, or the legacy `ENV key value with spaces`."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: args.partition(" ")[2].strip()} if len(words) > 1 else {words[0]: ""}
    return dict(word.partition("=")[::2] for word in words)


@dataclass
class Stage:
    """The final build stage, with ARG and ENV values substituted as Docker does."""

    base: str
    instructions: list[Instruction] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)  # shell-form RUN commands, substituted

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"the Dockerfile's final stage has no {keyword}"
        return found[-1]  # the last one is the one that counts (ENTRYPOINT, CMD, HEALTHCHECK, USER)

    def index(self, instruction: Instruction) -> int:
        return self.instructions.index(instruction)

    def variables(self) -> dict[str, str]:
        return {**self.args, **self.env}


def final_stage(instructions: list[Instruction]) -> Stage:
    global_args: dict[str, str] = {}
    stage: Stage | None = None
    for instruction in instructions:
        if instruction.keyword == "ARG" and stage is None:
            global_args.update(key_values(instruction.args))
        elif instruction.keyword == "FROM":
            base = substitute(instruction.args.split()[0], global_args)
            stage = Stage(base)
        elif stage is None:
            raise AssertionError(f"line {instruction.line}: {instruction.keyword} before FROM")
        else:
            stage.instructions.append(instruction)
            if instruction.keyword == "ARG":
                for name, value in key_values(instruction.args).items():
                    stage.args[name] = value or global_args.get(name, "")
            elif instruction.keyword == "ENV":
                for name, value in key_values(instruction.args).items():
                    stage.env[name] = substitute(value, stage.variables())
            elif instruction.keyword == "RUN" and instruction.exec_form is None:
                stage.runs.append(substitute(instruction.args, stage.variables()))
    assert stage is not None, "the Dockerfile has no FROM"
    return stage


# --- a .dockerignore matcher (Docker's rules: Go filepath.Match, `**`, `!` exceptions, last match wins) --


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i + 1)
            out += pattern[i : end + 1]  # a character class, [^...] included, reads the same
            i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out)


def dockerignore(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negated, _ignore_regex(pattern)))
    return rules


def ignored(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Whether `path` (relative to the build context) is left out: the last rule matching it or a parent."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            result = not negated
    return result
