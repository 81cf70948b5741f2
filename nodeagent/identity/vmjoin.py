"""``nodeagent vm join``: what a VM needs to join the mesh, written on the mesh's side.

As ``istioctl x workload entry configure`` does for Istio: run where the CA and the mesh
config live, it takes a WorkloadGroup of the config, the VM's node name and address, and
writes into an output directory everything the VM's agent (``deploy/systemd``) needs:

- ``workloadentry.yaml``: the VM's WorkloadEntry, made from the group's template (its
  ``spec.metadata`` labels and annotations, serviceAccount, ports, network, locality,
  weight) with the VM's address and the annotation ``nodeagent.io/node: <node>``, so the
  VM's agent serves it and the CA signs its identity for that node and no other;
- ``token``: a fresh bootstrap token for the node, added to (or replacing the node's in)
  the CA's node tokens file (``NodeTokenAuthenticator``), rewritten atomically, 0600;
- ``root-cert.pem``: the mesh's trust bundle;
- ``nodeagent.env``: the unit's ``NODEAGENT_OPTS`` (node name, CA address, token file,
  trust bundle).

``--apply`` also writes the entry into the config directory. Everything is read and
checked before anything is written: the config loads, the group exists, the entry loads
with the rest of the config and lands on the VM's node, the tokens file and the trust
bundle are readable, the output directory is empty (unless ``--force``).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nodeagent.control.fields import DNS_LABEL, DNS_SUBDOMAIN
from nodeagent.control.files import assemble, read_directory
from nodeagent.control.parse import Pair, parse_documents
from nodeagent.errors import ConfigErrors, LocalStateError, NodeAgentError
from nodeagent.identity import VM_DIR as DEFAULT_VM_DIR
from nodeagent.identity import VM_ENTRY_FILE as ENTRY_FILE
from nodeagent.identity import VM_ENV_FILE as ENV_FILE
from nodeagent.identity import VM_ROOT_CERT_FILE as ROOT_CERT_FILE
from nodeagent.identity import VM_TOKEN_FILE as TOKEN_FILE
from nodeagent.identity.ca import load_pem_certificates
from nodeagent.identity.ca_server import read_node_tokens
from nodeagent.model.entries import WORKLOAD_NODE_ANNOTATION, WorkloadEntry, WorkloadGroup
from nodeagent.model.objects import DEFAULT_TRUST_DOMAIN

__all__ = [
    "JoinError",
    "JoinRequest",
    "Joined",
    "join",
    "render_entry",
    "set_node_token",
]

DEFAULT_REDIRECT = "auto"
_ADDR = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


class JoinError(NodeAgentError):
    """A join that cannot be done as asked: the message names what is wrong and where."""


@dataclass(frozen=True)
class JoinRequest:
    """What ``nodeagent vm join`` is given."""

    config_dir: Path
    group: str
    namespace: str
    node: str
    address: str
    tokens_file: Path
    trust_bundle: Path
    ca_address: str
    out_dir: Path
    ca_server_name: str = ""
    vm_dir: str = DEFAULT_VM_DIR
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    redirect: str = DEFAULT_REDIRECT
    force: bool = False
    apply: bool = False


@dataclass(frozen=True)
class Joined:
    """What a join wrote."""

    entry: str
    """The WorkloadEntry's ``namespace/name``."""
    identity: str
    out_dir: Path
    applied_to: Path | None
    replaced_token: bool
    """The node had a token already: it no longer works."""


# --------------------------------------------------------------------------- checks


def _check_request(req: JoinRequest) -> str:
    """The address, normalized; ``JoinError`` for a bad flag."""
    if not DNS_SUBDOMAIN.match(req.node) or len(req.node) > 253:
        raise JoinError(
            f"--name {req.node!r}: a node name is a DNS name (lowercase letters, digits, '-' "
            "and '.'), the name the VM's agent runs with (`nodeagent run --node`)"
        )
    if not DNS_LABEL.match(req.namespace):
        raise JoinError(f"--namespace {req.namespace!r} is not a namespace name")
    try:
        address = str(ipaddress.ip_address(req.address))
    except ValueError:
        raise JoinError(
            f"--address {req.address!r} is not an IP address (the VM's address the mesh "
            "dials, e.g. 192.168.121.10)"
        ) from None
    if not (req.ca_address.startswith("unix:") or _valid_host_port(req.ca_address)):
        raise JoinError(
            f"--ca-address {req.ca_address!r}: expected HOST:PORT (TLS, verified with the "
            "trust bundle), e.g. 10.0.0.1:15012, or unix:PATH"
        )
    for flag, value in (
        ("--ca-address", req.ca_address),
        ("--ca-server-name", req.ca_server_name),
        ("--vm-dir", req.vm_dir),
    ):
        if any(c.isspace() or c in "\"'\\$`" for c in value):
            raise JoinError(
                f"{flag} {value!r}: the unit splits its options on spaces; no spaces, "
                "quotes, '$', '`' or '\\'"
            )
    if not req.vm_dir.startswith("/"):
        raise JoinError(f"--vm-dir {req.vm_dir!r}: an absolute path on the VM")
    return address


def _valid_host_port(text: str) -> bool:
    m = _ADDR.match(text)
    return m is not None and 0 < int(m.group(2)) < 65536


def _entry_name(group: str, node: str) -> str:
    name = f"{group}-{node}"
    if len(name) > 253:
        raise JoinError(f"the WorkloadEntry name {name!r} is longer than 253 characters")
    return name


def _find_group(pairs: list[Pair], req: JoinRequest) -> WorkloadGroup:
    groups = [m for _, m in pairs if isinstance(m, WorkloadGroup)]
    for g in groups:
        if g.namespace == req.namespace and g.name == req.group:
            return g
    known = ", ".join(sorted(g.key for g in groups)) or "none"
    raise JoinError(
        f"no WorkloadGroup {req.namespace}/{req.group} in {req.config_dir} "
        f"(WorkloadGroups there: {known})"
    )


def render_entry(group: WorkloadGroup, name: str, node: str, address: str) -> dict[str, Any]:
    """The VM's WorkloadEntry as Istio's auto-registration makes it from ``group``: the
    template, its labels merged with the group's (the group's win), the group's
    annotations and ``nodeagent.io/node``."""
    t = group.template or WorkloadEntry(namespace=group.namespace, name="")
    labels = {**dict(t.labels), **dict(group.labels)}
    annotations = {**dict(group.annotations), WORKLOAD_NODE_ANNOTATION: node}
    meta: dict[str, Any] = {"name": name, "namespace": group.namespace}
    if labels:
        meta["labels"] = labels
    meta["annotations"] = annotations
    spec: dict[str, Any] = {"address": address}
    if labels:
        spec["labels"] = dict(labels)  # only spec.labels select, as in Istio
    if t.service_account:
        spec["serviceAccount"] = t.service_account
    if t.ports:
        spec["ports"] = dict(t.ports)
    if t.network:
        spec["network"] = t.network
    if t.locality:
        spec["locality"] = t.locality
    if t.weight:
        spec["weight"] = t.weight
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": meta,
        "spec": spec,
    }


def _checked_entry(
    req: JoinRequest, found_pairs: list[Pair], doc: dict[str, Any]
) -> tuple[str, str]:
    """The entry's YAML and identity once it loads with the rest of the config and lands
    on the VM's node; ``JoinError`` naming what fails."""
    text = yaml.safe_dump(doc, sort_keys=False)
    target = req.config_dir / _applied_name(doc)
    key = f"{doc['metadata']['namespace']}/{doc['metadata']['name']}"
    others: list[Pair] = []
    for raw, model in found_pairs:
        same = isinstance(model, WorkloadEntry) and model.key == key
        source = str(raw.get("_source", ""))
        if req.apply and source == str(target) and not same:
            raise JoinError(
                f"{target} holds other objects than the WorkloadEntry {key}: --apply would "
                "overwrite them; move them to another file"
            )
        if same and req.apply and source != str(target):
            raise JoinError(
                f"WorkloadEntry {key} is already in {source}: remove it there, or leave "
                "--apply out and apply the written entry yourself"
            )
        if not same:  # a same-named entry is what this one replaces
            others.append((raw, model))
    new_pairs, new_errors, _ = parse_documents(text, str(target))
    try:
        loaded = assemble([*others, *new_pairs], new_errors, sources=(str(req.config_dir),))
    except ConfigErrors as e:
        raise JoinError(
            f"the WorkloadEntry {key} would not load with {req.config_dir}: {e}"
        ) from None
    snap = loaded.snapshot
    mine = [w for w in snap.workload_entries_on_node(req.node) if w.key == key]
    if not mine:  # the loader dropped or moved it: a bug, not the user's
        raise JoinError(f"the WorkloadEntry {key} loads, but not on node {req.node}")
    return text, mine[0].identity(req.trust_domain)


def _applied_name(doc: dict[str, Any]) -> str:
    return f"workloadentry-{doc['metadata']['namespace']}-{doc['metadata']['name']}.yaml"


def _check_out_dir(req: JoinRequest) -> None:
    out = req.out_dir
    if out.exists() and not out.is_dir():
        raise JoinError(f"-o {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not req.force:
        raise JoinError(f"-o {out}: the directory is not empty (--force writes into it)")


# --------------------------------------------------------------------------- writing


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically (a temporary file beside it, then rename), with ``mode``
    from its first byte; the owner of a file it replaces is kept where allowed."""
    try:
        before = path.stat()
    except FileNotFoundError:
        before = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if before is not None and os.geteuid() == 0:
                # root rewriting the CA's file must leave it readable by the CA's user
                os.fchown(f.fileno(), before.st_uid, before.st_gid)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _env_text(req: JoinRequest, key: str) -> str:
    vm = req.vm_dir.rstrip("/") or "/"
    opts = [f"--node {req.node}", f"--redirect {req.redirect}", f"--ca-addr {req.ca_address}"]
    if req.ca_server_name:
        opts.append(f"--ca-server-name {req.ca_server_name}")
    opts.append(f"--ca-token-file {vm}/{TOKEN_FILE}")
    opts.append(f"--trust-bundle {vm}/{ROOT_CERT_FILE}")
    if req.trust_domain != DEFAULT_TRUST_DOMAIN:
        opts.append(f"--trust-domain {req.trust_domain}")
    return (
        f"# Written by `nodeagent vm join` for node {req.node} (WorkloadEntry {key}).\n"
        f"# Install as {vm}/{ENV_FILE}, with {TOKEN_FILE} and {ROOT_CERT_FILE} beside it;\n"
        f"# {ENTRY_FILE} goes into the mesh config ({vm}/config/) with the mesh's YAML.\n"
        "# nodeagent.service passes --node %H (the hostname) first; the --node here comes\n"
        "# later and wins, so the agent runs as the node the WorkloadEntry names.\n"
        f'NODEAGENT_OPTS="{" ".join(opts)}"\n'
    )


def set_node_token(path: Path, node: str, token: str) -> bool:
    """Add or replace ``node``'s token in the CA's tokens file; True if it replaced one."""
    # one join at a time per directory: two would each rewrite the file from what they read
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        tokens = read_node_tokens(path)
        replaced = node in tokens
        tokens[node] = token
        _write_file(path, (json.dumps(tokens, indent=2, sort_keys=True) + "\n").encode(), 0o600)
        return replaced
    finally:
        os.close(dir_fd)


def join(req: JoinRequest) -> Joined:
    """Check everything, then write the output directory, the tokens file and (with
    ``apply``) the entry into the config; ``JoinError``/``NodeAgentError`` on a problem."""
    address = _check_request(req)
    try:  # the config as the mesh loads it now: a broken one is fixed first
        found = read_directory(req.config_dir)
        assemble(found.pairs, found.errors, sources=found.sources)
    except ConfigErrors as e:
        raise JoinError(f"the mesh config in {req.config_dir} does not load: {e}") from None
    pairs = list(found.pairs)
    group = _find_group(pairs, req)
    doc = render_entry(group, _entry_name(group.name, req.node), req.node, address)
    text, identity = _checked_entry(req, pairs, doc)
    key = f"{group.namespace}/{doc['metadata']['name']}"
    try:
        read_node_tokens(req.tokens_file)
    except LocalStateError as e:
        raise JoinError(f"--ca-tokens: {e}") from None
    try:
        bundle = req.trust_bundle.read_bytes()
        load_pem_certificates(bundle, f"--trust-bundle {req.trust_bundle}")
    except OSError as e:
        raise JoinError(f"--trust-bundle: cannot read {req.trust_bundle}: {e}") from None
    except LocalStateError as e:
        raise JoinError(str(e)) from None
    if not os.access(req.tokens_file.parent, os.W_OK):
        raise JoinError(f"--ca-tokens {req.tokens_file}: its directory is not writable")
    _check_out_dir(req)

    token = secrets.token_urlsafe(32)
    out = req.out_dir
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_file(out / ENTRY_FILE, text.encode(), 0o644)
        _write_file(out / TOKEN_FILE, (token + "\n").encode(), 0o600)
        _write_file(out / ROOT_CERT_FILE, bundle, 0o644)
        _write_file(out / ENV_FILE, _env_text(req, key).encode(), 0o644)
    except OSError as e:
        raise JoinError(f"cannot write into -o {out}: {e}") from None
    try:
        replaced = set_node_token(req.tokens_file, req.node, token)
    except OSError as e:
        raise JoinError(f"cannot rewrite the CA's tokens file {req.tokens_file}: {e}") from None
    applied: Path | None = None
    if req.apply:
        applied = req.config_dir / _applied_name(doc)
        try:
            _write_file(applied, text.encode(), 0o644)
        except OSError as e:
            raise JoinError(f"cannot write the WorkloadEntry into {applied}: {e}") from None
    return Joined(key, identity, out, applied, replaced)
