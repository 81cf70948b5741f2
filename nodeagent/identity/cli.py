"""``nodeagent ca``: create a mesh CA (``init``) and run its signing service (``serve``).

Parses arguments, calls ``nodeagent.identity.ca`` / ``ca_server`` and prints for humans
(``init``) or logs to stderr (``serve``); nothing else lives here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
from pathlib import Path

from nodeagent.cliargs import add_log_level
from nodeagent.errors import ConfigError, ConfigErrors, NodeAgentError
from nodeagent.model.objects import DEFAULT_TRUST_DOMAIN

__all__ = ["add_parser", "parse_duration"]

log = logging.getLogger("nodeagent.ca")

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in ``24h``, ``1h30m``, ``90s``, ``500ms`` or a bare number of seconds."""
    t = text.strip()
    try:
        value = float(t)
    except ValueError:
        pass
    else:
        if value < 0 or value != value:
            raise argparse.ArgumentTypeError(f"{text!r}: a duration cannot be negative")
        return value
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(t) or not t:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (like 24h, 1h30m, 90s, or seconds)"
        )
    return total


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``nodeagent ca`` and its subcommands."""
    p = sub.add_parser(
        "ca",
        help="the mesh certificate authority: create one, run its signing service",
        description="The mesh certificate authority (SPIFFE X.509 workload certificates).",
    )
    csub = p.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")

    init = csub.add_parser(
        "init",
        help="create a CA directory (a new root, an existing root, or an intermediate)",
        description="Create a CA directory. Without --root-cert/--cert-chain, a new ECDSA "
        "P-256 root valid 10 years is made. The directory's trust-bundle.pem is what agents "
        "trust: append another root to it to rotate roots.",
    )
    init.add_argument("--dir", required=True, help="the CA directory to create")
    init.add_argument(
        "--trust-domain",
        default=DEFAULT_TRUST_DOMAIN,
        help=f"the SPIFFE trust domain (default: {DEFAULT_TRUST_DOMAIN})",
    )
    init.add_argument(
        "--root-cert",
        default=None,
        metavar="FILE",
        help="an existing root (PEM) (default: none, so a new root is made)",
    )
    init.add_argument(
        "--root-key",
        default=None,
        metavar="FILE",
        help="the private key of --root-cert (PEM) (default: none)",
    )
    init.add_argument(
        "--cert-chain",
        default=None,
        metavar="FILE",
        help="an intermediate to sign with, then its issuers up to the root (PEM) (default: none)",
    )
    init.add_argument(
        "--key",
        default=None,
        metavar="FILE",
        help="the private key of --cert-chain's intermediate (PEM) (default: none)",
    )
    init.set_defaults(func=_cmd_init)

    serve = csub.add_parser(
        "serve",
        help="run the certificate-signing service (Istio's CreateCertificate)",
        description="Serve istio.v1.auth.IstioCertificateService. Each agent authenticates "
        "with its node token and gets certificates only for identities of pods scheduled "
        "on its node. Stops on SIGTERM.",
    )
    serve.add_argument("--dir", required=True, help="the CA directory (see `nodeagent ca init`)")
    serve.add_argument(
        "--listen",
        required=True,
        metavar="ADDR",
        help="unix:/run/nodeagent/ca.sock (made 0600) or 127.0.0.1:PORT",
    )
    serve.add_argument(
        "--config", required=True, metavar="DIR", help="the mesh YAML (where pods are scheduled)"
    )
    serve.add_argument(
        "--tokens",
        required=True,
        metavar="FILE",
        help='node tokens, JSON {"<node>": "<token>", ...}',
    )
    serve.add_argument(
        "--max-ttl",
        type=parse_duration,
        default=24 * 3600.0,
        metavar="DURATION",
        help="longest certificate lifetime granted (default: 24h)",
    )
    serve.add_argument(
        "--min-ttl",
        type=parse_duration,
        default=10.0,
        metavar="DURATION",
        help="shortest certificate lifetime granted; shorter requests get this (default: 10s)",
    )
    add_log_level(serve)
    serve.set_defaults(func=_cmd_serve)


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise NodeAgentError(f"cannot read the {what} {path}: {e}") from e


def _cmd_init(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import hashes

    from nodeagent.identity.ca import TRUST_BUNDLE, CertificateAuthority, init_ca

    try:
        d = init_ca(
            args.dir,
            args.trust_domain,
            root_cert=_read(args.root_cert, "root certificate"),
            root_key=_read(args.root_key, "root key"),
            cert_chain=_read(args.cert_chain, "certificate chain"),
            key=_read(args.key, "intermediate key"),
        )
        ca = CertificateAuthority.load(d)
    except NodeAgentError as e:
        print(f"nodeagent ca init: error: {e}", file=sys.stderr)
        return 1
    cert = ca.signing_certificate
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":")
    print(f"CA created in {d} for trust domain {ca.trust_domain}")
    print(f"  signs with:   {cert.subject.rfc4514_string()}")
    print(f"  sha256:       {fingerprint}")
    print(f"  valid until:  {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
    print(f"  trust bundle: {d / TRUST_BUNDLE} (give it to every agent)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return uvloop.run(_serve(args))
    except (ConfigErrors, ConfigError) as e:
        log.error("the mesh config in %s is invalid:\n%s", args.config, e)
        return 2
    except NodeAgentError as e:
        log.error("%s", e)
        return 1


async def _serve(args: argparse.Namespace) -> int:
    from nodeagent.identity.ca import CertificateAuthority
    from nodeagent.identity.ca_server import (
        NodeTokenAuthenticator,
        PlacementAuthorizer,
        start_ca_server,
    )

    ca = CertificateAuthority.load(
        args.dir, max_ttl_seconds=args.max_ttl, min_ttl_seconds=args.min_ttl
    )
    authenticator = NodeTokenAuthenticator(args.tokens)
    authorizer = PlacementAuthorizer(args.config, trust_domain=ca.trust_domain)
    server = await start_ca_server(ca, args.listen, authenticator, authorizer)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("CA stopping")
    await server.stop(1.0)
    return 0
