"""Owns shell completion: bash, zsh and fish scripts generated from the command line's parser,
so every command, option and choice the CLI has is completed and none is invented."""

from __future__ import annotations

import argparse
import shlex

# Options whose value is a path: completed with file names.
_PATH_METAVARS = ("DIR", "FILE", "INPUT", "PATH")


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help_of(parser: argparse.ArgumentParser, name: str) -> str:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest == name:
                    return choice.help or ""
    return ""


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings]


def _takes_path(action: argparse.Action) -> bool:
    return action.nargs != 0 and str(action.metavar or "").upper() in _PATH_METAVARS


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    if shell == "fish":
        return _fish(parser)
    bash = _bash(parser)
    if shell == "zsh":  # zsh runs bash completion functions through bashcompinit
        return ("#compdef poolkeeper\nautoload -U +X bashcompinit && bashcompinit\n" + bash)
    return bash


def _bash(parser: argparse.ArgumentParser) -> str:
    commands = _commands(parser)
    top = " ".join([*commands, "--help", "--version"])
    cases = []
    for name, sub in commands.items():
        words = " ".join(o for a in _options(sub) for o in a.option_strings)
        prev = []
        for action in _options(sub):
            flags = "|".join(action.option_strings)
            if action.choices:
                choices = " ".join(str(c) for c in action.choices)
                prev.append(f"      {flags}) COMPREPLY=($(compgen -W {shlex.quote(choices)} "
                            f'-- "$cur")); return;;')
            elif _takes_path(action):
                prev.append(f'      {flags}) COMPREPLY=($(compgen -f -- "$cur")); return;;')
        positional = [a for a in sub._actions if not a.option_strings and a.choices]
        default = (f"compgen -W {shlex.quote(' '.join(map(str, positional[0].choices or ())))} "
                   '-- "$cur"') if positional else 'compgen -f -- "$cur"'
        cases.append(
            f"    {name})\n"
            f'      case "$prev" in\n' + "\n".join(prev) + ("\n" if prev else "") +
            "      esac\n"
            f'      if [[ "$cur" == -* ]]; then\n'
            f'        COMPREPLY=($(compgen -W {shlex.quote(words)} -- "$cur"))\n'
            f"      else\n"
            f"        COMPREPLY=($({default}))\n"
            f"      fi;;")
    return (
        "# poolkeeper completion for bash: source <(poolkeeper completion bash)\n"
        "_poolkeeper() {\n"
        '  local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"\n'
        "  if [[ $COMP_CWORD -eq 1 ]]; then\n"
        f'    COMPREPLY=($(compgen -W {shlex.quote(top)} -- "$cur")); return\n'
        "  fi\n"
        '  case "${COMP_WORDS[1]}" in\n' + "\n".join(cases) + "\n  esac\n}\n"
        "complete -F _poolkeeper poolkeeper\n")


def _fish(parser: argparse.ArgumentParser) -> str:
    commands = _commands(parser)
    lines = ["# poolkeeper completion for fish: poolkeeper completion fish | source",
             "complete -c poolkeeper -f"]
    for name in commands:
        lines.append(f"complete -c poolkeeper -n __fish_use_subcommand -a {name} "
                     f"-d {shlex.quote(_help_of(parser, name))}")
    for name, sub in commands.items():
        condition = f"'__fish_seen_subcommand_from {name}'"
        for action in _options(sub):
            longs = [o[2:] for o in action.option_strings if o.startswith("--")]
            shorts = [o[1:] for o in action.option_strings if len(o) == 2]
            if not longs and not shorts:
                continue
            spec = " ".join([*(f"-l {o}" for o in longs), *(f"-s {o}" for o in shorts)])
            extra = ""
            if action.choices:
                extra = f" -x -a {shlex.quote(' '.join(map(str, action.choices)))}"
            elif _takes_path(action):
                extra = " -r -F"
            description = (action.help or "").split(" (default")[0]
            lines.append(f"complete -c poolkeeper -n {condition} {spec}{extra} "
                         f"-d {shlex.quote(description[:80])}")
        for action in sub._actions:
            if not action.option_strings and action.choices:
                lines.append(f"complete -c poolkeeper -n {condition} -x -a "
                             f"{shlex.quote(' '.join(map(str, action.choices)))}")
            elif not action.option_strings and _takes_path(action):
                lines.append(f"complete -c poolkeeper -n {condition} -F")
    return "\n".join(lines) + "\n"
