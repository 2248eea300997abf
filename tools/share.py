"""The man pages and shell completions of lockctl and lockd, written from their argparse
definitions: `python -m tools.share` rewrites them, `python -m tools.share --check` lists
those that are stale (exit 1).

Invariant: every file this writes follows from `lockd_client.cli.build_parser()` and
`lockd.__main__.build_parser()` alone, byte for byte the same on every host and every run,
so a test can tell a stale file from a fresh one (tests/test_share.py).

The files are generated ahead and committed, not at build time: they then need nothing but
the two parsers, a review sees how a change to an option reads in them, and installing a
wheel needs no build step. Completions are static scripts: completing runs no Python.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Program:
    name: str
    section: int
    parser: argparse.ArgumentParser
    #: Where its files go: the distribution that installs the program.
    share: Path
    #: Sections after the options: (title, text), text as written (one paragraph per line).
    extra: tuple[tuple[str, str], ...]


def programs() -> list[Program]:
    from lockd_client import cli, paths

    from lockd.__main__ import build_parser as lockd_parser

    return [
        Program(
            "lockctl", 1, cli.build_parser(), ROOT / "client" / "share",
            (
                ("ENVIRONMENT", f"{paths.SOCKET_ENV}\tlockd's socket when --socket is not given "
                 "(an absolute path).\nLOCKD_TOKEN, LOCKD_TOKENS\tset for CMD: the fencing token "
                 "of the first NAME, and name=token pairs separated by spaces."),
                ("SEE ALSO", "lockd(8), flock(1); docs/cli.md in lockd's source for the full "
                 "reference and the status --json schema."),
            ),
        ),
        Program(
            "lockd", 8, lockd_parser(), ROOT / "share",
            (
                ("ENVIRONMENT", f"{paths.SOCKET_ENV}\tthe socket to serve on when neither --socket "
                 "nor the config file names one (an absolute path).\nNOTIFY_SOCKET, LISTEN_FDS\t"
                 "set by systemd: readiness notification and socket activation."),
                ("SEE ALSO", "lockctl(1), flock(1), systemd.socket(5); docs/configuration.md and "
                 "docs/service.md in lockd's source."),
            ),
        ),
    ]


def files() -> dict[Path, str]:
    """Every generated file, by path, with its content."""
    out = {}
    for program in programs():
        out[program.share / "man" / f"man{program.section}" / f"{program.name}.{program.section}"] = man_page(program)
        out[program.share / "bash-completion" / "completions" / program.name] = bash_completion(program)
        out[program.share / "zsh" / "site-functions" / f"_{program.name}"] = zsh_completion(program)
    return out


# --- reading a parser -----------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """Each subcommand's name, summary and parser; {} for a parser without subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {choice.dest: choice.help or "" for choice in action._choices_actions}
            return {name: (summaries.get(name, ""), sub) for name, sub in action.choices.items()}
    return {}


def _leaves(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """Each command that does something, with its summary and parser: a subcommand, or a
    group's subcommand under both names (`daemon reexec`)."""
    leaves = {}
    for name, (summary, sub) in _commands(parser).items():
        group = _commands(sub)
        if group:
            leaves.update({f"{name} {inner}": leaf for inner, leaf in group.items()})
        else:
            leaves[name] = (summary, sub)
    return leaves


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help is not argparse.SUPPRESS]


def _positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper()


def _value(action: argparse.Action) -> str:
    """How an option's value reads in a man page: FILE, or [FILE] when it may be left out."""
    return f"[{_metavar(action)}]" if action.nargs == "?" else _metavar(action)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The option's help as --help shows it, %(default)s and the like filled in."""
    return parser._get_formatter()._expand_help(action) if action.help else ""


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().removeprefix("usage: ").split())


def _is_file(action: argparse.Action) -> bool:
    return action.metavar in ("PATH", "FILE") or action.dest in ("config", "check_config", "socket")


def _is_dir(action: argparse.Action) -> bool:
    return action.metavar == "DIR"


# --- man pages --------------------------------------------------------------------------------


def _roff(text: str) -> str:
    """`text` as roff running text: backslashes, hyphens and line-leading dots made literal."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def _preformatted(text: str) -> str:
    """Text whose lines are kept, as the epilogs are written: examples, tables."""
    return ".PP\n.nf\n" + _roff(text.strip("\n")) + "\n.fi"


def _option_items(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in _options(parser):
        flags = ", ".join(
            f"\\fB{_roff(flag)}\\fR" + (f" \\fI{_roff(_value(action))}\\fR" if _takes_value(action) else "")
            for flag in action.option_strings
        )
        yield f".TP\n{flags}\n{_roff(_help(parser, action))}"
    for action in _positionals(parser):
        yield f".TP\n\\fI{_roff(_metavar(action))}\\fR\n{_roff(_help(parser, action) or 'a lock name')}"


def man_page(program: Program) -> str:
    from lockd_client import __version__

    parser = program.parser
    commands = _leaves(parser)
    out = [
        f'.\\" Generated by tools/share.py from {program.name}\'s argparse definitions: do not edit.',
        f'.TH {program.name.upper()} {program.section} "" "lockd {__version__}" '
        f'"{"User Commands" if program.section == 1 else "System Administration"}"',
        ".SH NAME",
        f"{program.name} \\- {_roff(parser.description.rstrip('.').split('. ')[0])}",
        ".SH SYNOPSIS",
    ]
    if commands:
        out += [".nf"] + [_roff(_usage(sub)) for _, sub in commands.values()] + [".fi"]
    else:
        out += [_roff(_usage(parser))]
    out += [".SH DESCRIPTION"] + [f".PP\n{_roff(p)}" for p in _paragraphs(parser.description)]
    if _options(parser):
        out += [".SH OPTIONS", *_option_items(parser)]
    if commands:
        out += [".SH COMMANDS"]
        for name, (summary, sub) in commands.items():
            out += [f'.SS "{program.name} {name}"', f".PP\n{_roff(_usage(sub))}"]
            out += [f".PP\n{_roff(p)}" for p in _paragraphs(sub.description or summary)]
            out += list(_option_items(sub))
            if sub.epilog:
                out += [_preformatted(sub.epilog)]
    if parser.epilog:
        out += [".SH NOTES", _preformatted(parser.epilog)]
    for title, text in program.extra:
        out += [f".SH {title}"]
        for line in text.split("\n"):
            head, tab, body = line.partition("\t")
            out += [f".TP\n\\fB{_roff(head)}\\fR\n{_roff(body)}" if tab else f".PP\n{_roff(line)}"]
    return "\n".join(out) + "\n"


# --- completions ------------------------------------------------------------------------------


def _bash_values(action: argparse.Action, cur: str = '"$cur"') -> str:
    """What bash offers for the value of `action`."""
    if action.choices is not None:
        return f'COMPREPLY=($(compgen -W "{" ".join(map(str, action.choices))}" -- {cur}))'
    if _is_dir(action):
        return f"COMPREPLY=($(compgen -d -- {cur}))"
    if _is_file(action):
        return f"COMPREPLY=($(compgen -f -- {cur}))"
    return "COMPREPLY=()"


def _bash_parser_case(parser: argparse.ArgumentParser, indent: str) -> list[str]:
    """Lines completing an option's value (after `prev`) or an option (`cur` starts with -)."""
    lines = [f'{indent}case $prev in']
    for action in _options(parser):
        if _takes_value(action):
            lines.append(f'{indent}    {"|".join(action.option_strings)}) {_bash_values(action)}; return ;;')
    lines.append(f"{indent}esac")
    flags = " ".join(flag for action in _options(parser) for flag in action.option_strings)
    lines.append(f'{indent}[[ $cur == -* ]] && COMPREPLY=($(compgen -W "{flags}" -- "$cur"))')
    return lines


def bash_completion(program: Program) -> str:
    parser, name = program.parser, program.name
    commands = _commands(parser)
    fn = f"_{name}"
    out = [
        f"# bash completion for {name}: generated by tools/share.py from its argparse definitions; do not edit.",
        f"{fn}() {{",
        '    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}',
        "    COMPREPLY=()",
    ]
    if commands:
        groups = [command for command, (_, sub) in commands.items() if _commands(sub)]
        out += [
            '    local command="" i',
            "    for ((i = 1; i < COMP_CWORD; i++)); do",
            '        if [[ -z $command && ${COMP_WORDS[i]} != -* ]]; then',
            "            command=${COMP_WORDS[i]}",
        ]
        for group in groups:
            out += [
                f'        elif [[ $command == {group} && ${{COMP_WORDS[i]}} != -* ]]; then',
                '            command+=" ${COMP_WORDS[i]}"  # its subcommand',
            ]
        out += [
            '        elif [[ $command == acquire && ${COMP_WORDS[i]} == -- ]]; then',
            "            # CMD: complete it as a command line of its own.",
            "            if declare -F _command_offset >/dev/null; then",
            "                _command_offset $((i + 1))",
            "            elif ((i + 1 == COMP_CWORD)); then",
            '                COMPREPLY=($(compgen -c -- "$cur"))',
            "            else",
            '                COMPREPLY=($(compgen -f -- "$cur"))',
            "            fi",
            "            return",
            "        fi",
            "    done",
            '    case $command in',
        ]
        top = " ".join([*commands, *(f for a in _options(parser) for f in a.option_strings)])
        out.append(f'        "") COMPREPLY=($(compgen -W "{top}" -- "$cur")) ;;')
        for command, (_, sub) in commands.items():
            group = _commands(sub)
            out.append(f"        {command})")
            if group:
                out.append(f'            COMPREPLY=($(compgen -W "{" ".join(group)}" -- "$cur"))')
            out += _bash_parser_case(sub, "            ")
            out.append("            ;;")
            for inner, (_, leaf) in group.items():
                out.append(f'        "{command} {inner}")')
                out += _bash_parser_case(leaf, "            ")
                out.append("            ;;")
        out.append("    esac")
    else:
        out += _bash_parser_case(parser, "    ")
    out += ["}", f"complete -F {fn} {name}"]
    return "\n".join(out) + "\n"


def _zsh_quote(text: str) -> str:
    return text.replace("'", "'\\''")


def _zsh_spec(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """One `_arguments` spec: the option's spellings exclude each other; a value has its action."""
    help_text = " ".join(_help(parser, action).split()).replace("\\", "\\\\")
    help_text = help_text.replace("[", "\\[").replace("]", "\\]").replace(":", "\\:")
    flags = action.option_strings
    head = f"'({' '.join(flags)})'" + ("{" + ",".join(flags) + "}" if len(flags) > 1 else f"'{flags[0]}'")
    if action.help and isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
        head = "'(- *)'" + ("{" + ",".join(flags) + "}" if len(flags) > 1 else f"'{flags[0]}'")
    elif isinstance(action, argparse._AppendAction):  # repeatable: offered again after use
        head = "'*'" + ("{" + ",".join(flags) + "}" if len(flags) > 1 else f"'{flags[0]}'")
    spec = f"'[{_zsh_quote(help_text)}]"
    if _takes_value(action):
        if action.choices is not None:
            what = f"({' '.join(map(str, action.choices))})"
        elif _is_dir(action):
            what = "_files -/"
        elif _is_file(action):
            what = "_files"
        else:
            what = " "
        optional = ":" if action.nargs == "?" else ""
        spec += f":{optional}{_zsh_quote(_metavar(action))}:{_zsh_quote(what)}"
    return head + spec + "'"


def _zsh_arguments(parser: argparse.ArgumentParser, indent: str, flags: str, extra: list[str]) -> list[str]:
    specs = [_zsh_spec(parser, action) for action in _options(parser)]
    for action in _positionals(parser):
        specs.append(f"'{'*' if action.nargs in ('*', '+') else ''}:{_metavar(action)}: '")
    specs += extra
    continued = [f"{indent}    {spec} \\" for spec in specs[:-1]]
    return [f"{indent}_arguments {flags} \\", *continued, f"{indent}    {specs[-1]}"]


def _zsh_group(
    program: str, command: str, group: dict[str, tuple[str, argparse.ArgumentParser]], indent: str,
) -> list[str]:
    """Completing after a group's name (`words[1]`): its subcommand, then that one's arguments."""
    described = " ".join(f"'{c}:{_zsh_quote(summary)}'" for c, (summary, _) in group.items())
    out = [
        f"{indent}if (( CURRENT == 2 )); then",
        f"{indent}    local -a subcommands=({described})",
        f"{indent}    _describe -t commands '{program} {command} command' subcommands",
        f"{indent}    return",
        f"{indent}fi",
        f"{indent}shift words",
        f"{indent}(( CURRENT-- ))",
        f"{indent}case $words[1] in",
    ]
    for inner, (_, leaf) in group.items():
        out.append(f"{indent}    {inner})")
        out += _zsh_arguments(leaf, f"{indent}        ", "-s -S", [])
        out.append(f"{indent}        ;;")
    return [*out, f"{indent}esac"]


def zsh_completion(program: Program) -> str:
    parser, name = program.parser, program.name
    commands = _commands(parser)
    out = [
        f"#compdef {name}",
        f"# zsh completion for {name}: generated by tools/share.py from its argparse definitions; do not edit.",
        "",
        f"_{name}() {{",
    ]
    if commands:
        described = " ".join(f"'{c}:{_zsh_quote(summary)}'" for c, (summary, _) in commands.items())
        out += [
            "    local curcontext=$curcontext state line",
            f"    local -a commands=({described})",
            *_zsh_arguments(parser, "    ", "-C", ["'1:command:->command'", "'*:: :->argument'"]),
            "    case $state in",
            f"        command) _describe -t commands '{name} command' commands ;;",
            "        argument)",
            "            case $words[1] in",
        ]
        for command, (_, sub) in commands.items():
            out.append(f"                {command})")
            if group := _commands(sub):
                out += _zsh_group(name, command, group, "                    ")
                out.append("                    ;;")
                continue
            if command == "acquire":
                out += [
                    "                    # After --, CMD: complete it as a command line of its own.",
                    "                    local dashes=${words[(i)--]}",
                    "                    if (( dashes < CURRENT )); then",
                    "                        shift $dashes words",
                    "                        (( CURRENT -= dashes ))",
                    "                        _normal",
                    "                        return",
                    "                    fi",
                ]
            out += _zsh_arguments(sub, "                    ", "-s -S", [])
            out.append("                    ;;")
        out += ["            esac", "            ;;", "    esac"]
    else:
        out += _zsh_arguments(parser, "    ", "-s -S", [])
    out += ["}", "", f'_{name} "$@"']
    return "\n".join(out) + "\n"


# --- command line -----------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    stale = []
    for path, content in files().items():
        current = path.read_text() if path.exists() else None
        if current == content:
            continue
        stale.append(path.relative_to(ROOT))
        if "--check" not in argv:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    if "--check" in argv and stale:
        print("stale (run python -m tools.share): " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    for path in stale:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
