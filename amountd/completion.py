"""Shell completions (bash, zsh) written from the argument parser itself, so they never
drift from `--help`. The shipped copies in amountd/data/completion/ are made with

    python -m amountd.completion amountd/data/completion

and a test checks they equal what this writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["bash", "zsh"]

_FILES = ("--unix", "--config", "--token-file", "--tls-cert", "--tls-key", "--tls-ca", "--under")


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings]


def _values(a: argparse.Action) -> list[str] | None:
    """The words an option's value can be, where they are a fixed set."""
    if a.choices is not None:
        return [str(c) for c in a.choices]
    if "--source" in a.option_strings:
        return ["auto", "fanotify", "mountinfo"]
    if "--output" in a.option_strings:
        from .columns import COLUMNS

        return list(COLUMNS)
    if "--action" in a.option_strings:
        from .model import ACTIONS

        return list(ACTIONS)
    if "--log-format" in a.option_strings:
        return ["text", "json"]
    if "--log-level" in a.option_strings:
        return ["debug", "info", "warning", "error"]
    return None


def bash(parser: argparse.ArgumentParser) -> str:
    """A bash completion script (`complete -F _amountd amountd`)."""
    cmds = _commands(parser)
    top = [s for a in _options(parser) for s in a.option_strings] + list(cmds)
    lines = [
        "# bash completion for amountd (written by `python -m amountd.completion`)",
        "_amountd() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
        '    local cmd="" i',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        case "${COMP_WORDS[i]}" in',
        f'            {"|".join(cmds)}) cmd="${{COMP_WORDS[i]}}"; break ;;',
        "        esac",
        "    done",
        '    case "$prev" in',
    ]
    seen: dict[str, str] = {}
    for p in [parser, *cmds.values()]:
        for a in _options(p):
            if a.nargs == 0:
                continue
            vals = _values(a)
            for s in a.option_strings:
                if s in seen:
                    continue
                if vals is not None:
                    words = " ".join(vals)
                    if "--output" in a.option_strings:
                        seen[s] = (
                            f'        {s}) COMPREPLY=($(compgen -P "${{cur%${{cur##*,}}}}" '
                            f'-W "{words}" -- "${{cur##*,}}")); return ;;'
                        )
                    else:
                        seen[s] = (
                            f'        {s}) COMPREPLY=($(compgen -W "{words}" -- "$cur")); return ;;'
                        )
                elif s in _FILES:
                    seen[s] = f'        {s}) COMPREPLY=($(compgen -f -- "$cur")); return ;;'
                else:
                    seen[s] = f"        {s}) return ;;"
    lines += seen.values()
    lines += ["    esac", "    local words", '    case "$cmd" in']
    lines.append(f'        "") words="{" ".join(top)}" ;;')
    for name, p in cmds.items():
        words = " ".join(s for a in _options(p) for s in a.option_strings)
        lines.append(f'        {name}) words="{words}" ;;')
    lines += [
        "    esac",
        '    COMPREPLY=($(compgen -W "$words" -- "$cur"))',
        "}",
        "complete -F _amountd amountd",
        "",
    ]
    return "\n".join(lines)


def _zq(text: str) -> str:
    """Text for inside a zsh _arguments spec in single quotes."""
    text = " ".join(text.split())
    for a, b in (("[", "("), ("]", ")"), (":", " -"), ("'", "'\\''"), ("`", "")):
        text = text.replace(a, b)
    return text


def _zspecs(p: argparse.ArgumentParser) -> list[str]:
    out = []
    for a in _options(p):
        desc = _zq(a.help or "") if a.help != argparse.SUPPRESS else ""
        if a.nargs == 0:
            arg = ""
        else:
            vals = _values(a)
            meta = _zq(str(a.metavar or a.dest))
            if vals is not None:
                arg = f":{meta}:({' '.join(vals)})"
            elif any(s in _FILES for s in a.option_strings):
                arg = f":{meta}:_files"
            else:
                arg = f":{meta}:"
        strings = a.option_strings
        if len(strings) > 1:
            excl = " ".join(strings)
            out.append(f"'({excl})'{{{','.join(strings)}}}'[{desc}]{arg}'")
        else:
            out.append(f"'{strings[0]}[{desc}]{arg}'")
    return out


def zsh(parser: argparse.ArgumentParser) -> str:
    """A zsh completion function (`_amountd`, for a directory on $fpath)."""
    cmds = _commands(parser)
    lines = [
        "#compdef amountd",
        "# zsh completion for amountd (written by `python -m amountd.completion`)",
        "",
        "_amountd() {",
        '    local curcontext="$curcontext" state line',
        "    local -a commands",
        "    commands=(",
    ]
    for name in cmds:
        help_text = ""
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for ch in a._choices_actions:
                    if ch.dest == name:
                        help_text = ch.help or ""
        lines.append(f"        '{name}:{_zq(help_text)}'")
    lines += ["    )", "    _arguments -C \\"]
    lines += [f"        {s} \\" for s in _zspecs(parser)]
    lines += [
        "        '1:command:->command' \\",
        "        '*::argument:->argument'",
        "    case $state in",
        "        command) _describe -t commands 'amountd command' commands ;;",
        "        argument)",
        "            case $line[1] in",
    ]
    for name, p in cmds.items():
        lines.append(f"                {name})")
        lines.append("                    _arguments \\")
        specs = _zspecs(p)
        lines += [f"                        {s} \\" for s in specs[:-1]]
        lines.append(f"                        {specs[-1]}")
        lines.append("                    ;;")
    lines += ["            esac", "            ;;", "    esac", "}", "", '_amountd "$@"', ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from .cli import build_parser

    out = Path(argv[0]) if argv else Path("amountd/data/completion")
    out.mkdir(parents=True, exist_ok=True)
    parser = build_parser()
    (out / "amountd").write_text(bash(parser))
    (out / "_amountd").write_text(zsh(parser))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
