"""``nodeagent vm``: bring a VM or bare host into the mesh (``join``).

Parses arguments, calls ``nodeagent.identity.vmjoin`` and prints for humans; nothing
else lives here. The join's modules (the config loader, the CA's) are imported when it
runs, not when ``nodeagent`` builds its parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nodeagent.errors import NodeAgentError
from nodeagent.identity import VM_DIR as DEFAULT_VM_DIR
from nodeagent.identity import VM_ENTRY_FILE as ENTRY_FILE
from nodeagent.identity import VM_ENV_FILE as ENV_FILE
from nodeagent.identity import VM_ROOT_CERT_FILE as ROOT_CERT_FILE
from nodeagent.identity import VM_TOKEN_FILE as TOKEN_FILE
from nodeagent.model.entries import WORKLOAD_NODE_ANNOTATION
from nodeagent.model.objects import DEFAULT_TRUST_DOMAIN

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``nodeagent vm`` and its subcommand ``join``."""
    p = sub.add_parser(
        "vm",
        help="bring a VM or bare host into the mesh",
        description="Bring a VM or bare Linux host into the mesh (docs/vms.md).",
    )
    vsub = p.add_subparsers(dest="vm_command", required=True, metavar="COMMAND")
    j = vsub.add_parser(
        "join",
        help="write what a VM needs to join: its WorkloadEntry, a CA token, the trust bundle",
        description="Run on the mesh's side, where the CA's tokens file and the mesh config "
        "live (as `istioctl x workload entry configure`). Writes into -o DIR: "
        f"{ENTRY_FILE} (the VM's WorkloadEntry from --group's template, annotated "
        f"{WORKLOAD_NODE_ANNOTATION}: --name), {TOKEN_FILE} (a new bootstrap token, added to "
        f"--ca-tokens, replacing the node's old one), {ROOT_CERT_FILE} (the trust bundle) and "
        f"{ENV_FILE} (the options of nodeagent.service). Copy them to the VM's "
        f"{DEFAULT_VM_DIR}/.\n\n"
        "  nodeagent vm join --config mesh/ --group ratings --name vm-1 \\\n"
        "      --address 192.168.121.10 --ca-tokens ca/tokens.json \\\n"
        "      --trust-bundle ca/trust-bundle.pem --ca-address 10.0.0.1:15012 -o vm-1/",
    )
    j.add_argument("--config", required=True, metavar="DIR", help="the mesh config directory")
    j.add_argument("--group", required=True, metavar="NAME", help="the WorkloadGroup to join")
    j.add_argument(
        "-n", "--namespace", default="default", help="the WorkloadGroup's namespace"
    )
    j.add_argument(
        "--name",
        required=True,
        metavar="NODE",
        help="the VM's node name (its agent's --node); the entry is GROUP-NODE",
    )
    j.add_argument("--address", required=True, metavar="IP", help="the VM's IP address")
    j.add_argument(
        "--ca-tokens",
        required=True,
        metavar="FILE",
        help="the CA's node tokens file (`nodeagent ca serve --tokens`), rewritten with the "
        "new token",
    )
    j.add_argument(
        "--trust-bundle",
        required=True,
        metavar="PEM",
        help="the mesh's root(s), e.g. the CA directory's trust-bundle.pem",
    )
    j.add_argument(
        "--ca-address",
        required=True,
        metavar="ADDR",
        help="where the VM reaches the CA: HOST:PORT (TLS) or unix:PATH",
    )
    j.add_argument(
        "--ca-server-name",
        default="",
        metavar="NAME",
        help="the name the CA's certificate carries, when not HOST (default: none)",
    )
    j.add_argument("-o", "--output", required=True, metavar="DIR", help="where to write")
    j.add_argument(
        "--force", action="store_true", help="write into -o DIR even when it is not empty"
    )
    j.add_argument(
        "--apply",
        action="store_true",
        help="also write the WorkloadEntry into --config (workloadentry-NS-NAME.yaml)",
    )
    j.add_argument(
        "--vm-dir",
        default=DEFAULT_VM_DIR,
        metavar="DIR",
        help="where the VM keeps the token and trust bundle, as nodeagent.env names them",
    )
    j.add_argument(
        "--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="the mesh's SPIFFE trust domain"
    )
    j.set_defaults(func=_cmd_join)


def _cmd_join(args: argparse.Namespace) -> int:
    from nodeagent.identity.vmjoin import JoinRequest, join

    req = JoinRequest(
        config_dir=Path(args.config),
        group=args.group,
        namespace=args.namespace,
        node=args.name,
        address=args.address,
        tokens_file=Path(args.ca_tokens),
        trust_bundle=Path(args.trust_bundle),
        ca_address=args.ca_address,
        ca_server_name=args.ca_server_name,
        out_dir=Path(args.output),
        vm_dir=args.vm_dir,
        trust_domain=args.trust_domain,
        force=args.force,
        apply=args.apply,
    )
    try:
        done = join(req)
    except NodeAgentError as e:
        print(f"nodeagent vm join: error: {e}", file=sys.stderr)
        return 1
    out = done.out_dir
    print(f"WorkloadEntry {done.entry} on node {req.node}: identity {done.identity}")
    print(f"  {out / ENTRY_FILE}")
    print(f"  {out / TOKEN_FILE}  (new token for {req.node}, added to {req.tokens_file}"
          + ("; its old token no longer works)" if done.replaced_token else ")"))
    print(f"  {out / ROOT_CERT_FILE}")
    print(f"  {out / ENV_FILE}")
    if done.applied_to is not None:
        print(f"  applied: {done.applied_to}")
    else:
        print(f"  not applied: add {ENTRY_FILE} to the mesh config (or --apply)")
    print(f"Copy them to the VM's {req.vm_dir}/ (the entry into its config/ too), set its "
          f"hostname or keep --node {req.node}, and start nodeagent.service.")
    return 0
