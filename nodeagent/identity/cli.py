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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nodeagent.cliargs import add_log_level
from nodeagent.errors import ConfigError, ConfigErrors, NodeAgentError
from nodeagent.identity import (
    DEFAULT_AGENT_SERVICE_ACCOUNT,
    DEFAULT_AUDIENCE,
    DEFAULT_SERVING_NAMES,
)
from nodeagent.model.objects import DEFAULT_TRUST_DOMAIN

if TYPE_CHECKING:
    from nodeagent.identity.ca import CertificateAuthority
    from nodeagent.identity.ca_server import Authenticator, Authorizer
    from nodeagent.identity.ca_tls import ServingCert

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
        "(a node token, or in a cluster its ServiceAccount token checked by a TokenReview) "
        "and gets certificates only for identities of pods scheduled on its node, or of "
        "WorkloadEntries annotated nodeagent.io/node with it. Stops on SIGTERM.",
    )
    serve.add_argument("--dir", required=True, help="the CA directory (see `nodeagent ca init`)")
    serve.add_argument(
        "--listen",
        required=True,
        metavar="ADDR",
        help="unix:/run/nodeagent/ca.sock (made 0600, plaintext) or HOST:PORT (TLS with --tls "
        "or --tls-cert; plaintext without, for loopback only)",
    )
    tls = serve.add_argument_group("TLS (for a HOST:PORT listener)")
    tls.add_argument(
        "--tls",
        action="store_true",
        help="serve TLS with a certificate the CA issues itself for --tls-name, replaced at "
        "half-life (default: off, plaintext)",
    )
    tls.add_argument(
        "--tls-name",
        action="append",
        default=None,
        metavar="NAME",
        help="a DNS name or IP address of the CA's certificate; repeat it; implies --tls "
        f"(default: {', '.join(DEFAULT_SERVING_NAMES)})",
    )
    tls.add_argument(
        "--tls-cert",
        default=None,
        metavar="FILE",
        help="serve TLS with this certificate chain (PEM) instead, re-read when it changes "
        "(default: none)",
    )
    tls.add_argument(
        "--tls-key",
        default=None,
        metavar="FILE",
        help="the private key of --tls-cert (PEM) (default: none)",
    )
    auth = serve.add_argument_group("who may ask for what")
    auth.add_argument(
        "--auth",
        choices=["tokens", "kubernetes"],
        default="tokens",
        help="tokens: per-node tokens (--tokens) and pods and WorkloadEntries from the mesh "
        "YAML (--config); kubernetes: ServiceAccount tokens checked with TokenReview, pods "
        "and WorkloadEntries from the API (default: tokens)",
    )
    auth.add_argument(
        "--config",
        default=None,
        metavar="DIR",
        help="--auth tokens: the mesh YAML, where pods and WorkloadEntries are placed "
        "(default: none; required with --auth tokens)",
    )
    auth.add_argument(
        "--tokens",
        default=None,
        metavar="FILE",
        help='--auth tokens: node tokens, JSON {"<node>": "<token>", ...} (default: none; '
        "required with --auth tokens)",
    )
    auth.add_argument(
        "--kubeconfig",
        default=None,
        metavar="FILE",
        help="--auth kubernetes: the API server's kubeconfig (default: in-cluster "
        "ServiceAccount credentials)",
    )
    auth.add_argument(
        "--audience",
        default=DEFAULT_AUDIENCE,
        help=f"--auth kubernetes: the audience agents' tokens must be for (default: "
        f"{DEFAULT_AUDIENCE})",
    )
    auth.add_argument(
        "--agent-service-account",
        action="append",
        default=None,
        metavar="NAMESPACE/NAME",
        help="--auth kubernetes: the agents' ServiceAccount; repeat it for several "
        f"(default: {DEFAULT_AGENT_SERVICE_ACCOUNT})",
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


def _serving_cert(args: argparse.Namespace, ca: CertificateAuthority) -> ServingCert | None:
    from nodeagent.identity.ca_tls import FileServingCert, IssuedServingCert

    if (args.tls_cert is None) != (args.tls_key is None):
        raise NodeAgentError("give both --tls-cert and --tls-key, or neither")
    if args.tls_cert is not None:
        if args.tls or args.tls_name:
            raise NodeAgentError(
                "--tls-cert/--tls-key serve that certificate; --tls and --tls-name are for "
                "one the CA issues itself: give one or the other"
            )
        return FileServingCert(args.tls_cert, args.tls_key)
    if args.tls or args.tls_name:
        return IssuedServingCert(ca, args.tls_name or DEFAULT_SERVING_NAMES)
    return None


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
    tls_wanted = bool(args.tls or args.tls_name or args.tls_cert)
    closing: list[Callable[[], Awaitable[None]]] = []
    authenticator: Authenticator
    authorizer: Authorizer
    if args.auth == "kubernetes":
        from nodeagent.identity.kube_auth import kubernetes_auth

        if args.config or args.tokens:
            raise NodeAgentError(
                "--config and --tokens are for --auth tokens; with --auth kubernetes pods "
                "come from the API"
            )
        if not tls_wanted and not args.listen.startswith("unix:"):
            raise NodeAgentError(
                f"--auth kubernetes on {args.listen} needs TLS (--tls or --tls-cert/--tls-key): "
                "ServiceAccount tokens must not cross the network in the clear"
            )
        authenticator, authorizer, close = kubernetes_auth(
            args.kubeconfig,
            audience=args.audience,
            agent_service_accounts=args.agent_service_account or [DEFAULT_AGENT_SERVICE_ACCOUNT],
            trust_domain=ca.trust_domain,
        )
        closing.append(close)
    else:
        if not args.config or not args.tokens:
            raise NodeAgentError(
                "--auth tokens needs --config DIR (where pods are scheduled) and --tokens FILE"
            )
        if args.kubeconfig:
            raise NodeAgentError("--kubeconfig is for --auth kubernetes")
        authenticator = NodeTokenAuthenticator(args.tokens)
        authorizer = PlacementAuthorizer(args.config, trust_domain=ca.trust_domain)
    try:
        tls = _serving_cert(args, ca)
        server = await start_ca_server(ca, args.listen, authenticator, authorizer, tls=tls)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("CA stopping")
        await server.stop(1.0)
    finally:
        for close in closing:
            await close()
    return 0
