"""The command line as a front door: ``nodeagent --help`` says what the product is, every
option of every subcommand has help and shows its default, ``--log-level`` takes only
real levels, and a reader that goes away (``| head``) ends the command quietly."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from checkout import ROOT, python_env

from nodeagent.cli import EXIT_BROKEN_PIPE, build_parser, main
from nodeagent.config import AgentSettings


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for child in _subcommands(parser).values():
        yield from _walk(child)


def _problems(parser: argparse.ArgumentParser) -> list[str]:
    """Every option or subcommand of ``parser`` and below without help, and every optional
    argument whose ``--help`` line does not say its default."""
    problems = []
    for p in _walk(parser):
        help_of = p._get_formatter()._get_help_string  # what --help prints for an action
        for action in p._actions:
            name = "/".join(action.option_strings) or action.dest
            if isinstance(action, argparse._SubParsersAction):
                problems += [
                    f"{p.prog} {c.dest}: no help" for c in action._choices_actions if not c.help
                ]
                continue
            if not action.help:
                problems.append(f"{p.prog} {name}: no help")
            if (
                not action.option_strings
                or action.required
                or action.nargs == 0  # a flag: --help, --version, store_true
                or isinstance(action, argparse._AppendAction)  # repeatable: none by default
                or action.default is argparse.SUPPRESS
            ):
                continue
            if "default" not in (help_of(action) or "").lower():
                problems.append(f"{p.prog} {name}: its help does not say its default")
    return problems


def test_help_says_what_the_product_is(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "sidecar-less service mesh" in out
    for word in ("HBONE", "eBPF", "iptables", "VirtualService", "AuthorizationPolicy"):
        assert word in out
    assert "The command line: the only place" not in out  # not the module's docstring
    for name in _subcommands(build_parser()):
        assert f"\n    {name}" in out  # each subcommand listed, one line of help each
    assert "nodeagent sandbox up examples/bookinfo" in out


def _top_level() -> list[str]:
    return sorted(_subcommands(build_parser()))


def test_top_level_options_and_commands_have_help() -> None:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert all(c.help for c in action._choices_actions)
        else:
            assert action.help, action.option_strings


@pytest.mark.parametrize("command", _top_level())
def test_every_option_has_help_and_shows_its_default(command: str) -> None:
    assert _problems(_subcommands(build_parser())[command]) == []


def test_the_default_is_shown_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["ctl", "--help"])
    assert "(default: 5.0)" in capsys.readouterr().out  # --timeout
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: istio-system)" in out and "(default: info)" in out


@pytest.mark.parametrize("argv", [["run", "--node", "n", "--config", "."], ["ca", "serve"]])
def test_log_level_rejects_what_is_not_a_level(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*argv, "--log-level", "verbose"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--log-level: invalid choice: 'verbose'" in err
    assert "'debug', 'info', 'warning', 'error', 'critical'" in err


@pytest.mark.parametrize("given, level", [("DEBUG", "debug"), ("Warning", "warning")])
def test_log_level_ignores_case(given: str, level: str) -> None:
    args = build_parser().parse_args(["run", "--node", "n", "--config", ".", "--log-level", given])
    assert args.log_level == level


@pytest.mark.parametrize("given", ["4317", "collector", "host:port", "host:70000"])
def test_otlp_endpoint_must_be_host_and_port(
    given: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["run", "--node", "n", "--config", ".", "--otlp-endpoint", given])
    assert exit_.value.code == 2
    assert f"--otlp-endpoint: {given!r} is not HOST:PORT" in capsys.readouterr().err


def test_otlp_endpoint_is_off_unless_given() -> None:
    base = ["run", "--node", "n", "--config", "."]
    off = AgentSettings.from_args(build_parser().parse_args(base))
    on = AgentSettings.from_args(
        build_parser().parse_args([*base, "--otlp-endpoint", "jaeger.tracing:4317"])
    )
    assert (off.otlp_endpoint, on.otlp_endpoint) == ("", "jaeger.tracing:4317")


def _run_into_closed_pipe(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """``nodeagent ARGV`` in a real process whose stdout's reader is already gone."""
    env = python_env()
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "nodeagent", *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)


@pytest.mark.parametrize(
    "argv, code",
    [
        (["run", "--node", "n1", "--config", ".", "--dump-bpf"], EXIT_BROKEN_PIPE),
        (["--help"], 0),  # argparse drops a failed help write itself
    ],
)
def test_a_closed_pipe_ends_quietly(argv: list[str], code: int) -> None:
    done = _run_into_closed_pipe(argv)
    assert done.stderr == b"", done.stderr.decode(errors="replace")
    assert done.returncode == code


def test_piped_into_head_ends_quietly() -> None:
    env = python_env()
    done = subprocess.run(
        [
            "sh",
            "-c",
            f"'{sys.executable}' -m nodeagent run --node n1 --config . --dump-bpf | head -c1",
        ],
        capture_output=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert (
        done.stdout == b"/" and b"Traceback" not in done.stderr and b"Exception" not in done.stderr
    )


def test_run_reaches_the_config_loader(tmp_path: Path) -> None:
    """``nodeagent run`` gets as far as reading its config (the agent's start-up path:
    a stray local import once shadowed ``os`` there and every agent died at start)."""
    env = python_env()
    missing = tmp_path / "no-such-config"
    done = subprocess.run(
        [sys.executable, "-m", "nodeagent", "run", "--node", "n1", "--config", str(missing)],
        capture_output=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert b"Traceback" not in done.stderr, done.stderr.decode(errors="replace")
    assert done.returncode == 2
    assert f"{missing}: not a directory".encode() in done.stderr


def test_grpc_sees_fork_support_off_before_it_is_imported() -> None:
    """gRPC reads ``GRPC_ENABLE_FORK_SUPPORT`` when it is first imported; the command
    line's own imports (the subcommands' modules) bring it in, so the setting must come
    first, or every fork of the agent (nsenter, iptables) logs a line of gRPC's."""
    script = (
        "import os, sys\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'grpc':\n"
        "            print('at import:', os.environ.get('GRPC_ENABLE_FORK_SUPPORT'))\n"
        "            sys.meta_path.remove(self)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Spy())\n"
        "from nodeagent.cli import main\n"
        "main(['native', 'status'])\n"
    )
    env = python_env()
    env.pop("GRPC_ENABLE_FORK_SUPPORT", None)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert "at import: false" in done.stdout.splitlines(), done.stdout + done.stderr


def test_path_normalization_is_istios_option_default_base(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["run", "--node", "n", "--config", "."]
    assert AgentSettings.from_args(build_parser().parse_args(argv)).path_normalization == "BASE"
    args = build_parser().parse_args([*argv, "--path-normalization", "merge_slashes"])
    assert AgentSettings.from_args(args).path_normalization == "MERGE_SLASHES"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--path-normalization", "strict"])
    err = capsys.readouterr().err
    assert "--path-normalization" in err and "DECODE_AND_MERGE_SLASHES" in err


def test_connection_caps_and_hbone_timeouts_are_flags(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["run", "--node", "n", "--config", "."]
    s = AgentSettings.from_args(build_parser().parse_args(argv))
    assert (s.max_connections, s.max_connections_per_listener) == (100_000, 20_000)
    assert (s.hbone_idle_timeout, s.hbone_preface_timeout) == (3600.0, 10.0)
    more = ["--max-connections", "5", "--max-connections-per-listener", "2"]
    more += ["--hbone-idle-timeout", "90s", "--hbone-preface-timeout", "2s"]
    s = AgentSettings.from_args(build_parser().parse_args([*argv, *more]))
    assert (s.max_connections, s.max_connections_per_listener) == (5, 2)
    assert (s.hbone_idle_timeout, s.hbone_preface_timeout) == (90.0, 2.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--max-connections", "0"])
    assert "--max-connections" in capsys.readouterr().err
