"""The agent's certificate store: one workload certificate per identity, kept fresh.

Owns, for one agent: the private keys (ECDSA P-256, generated and held in memory only),
the CSRs, asking the CA (through anything with ``async sign(csr_pem, ttl_seconds)``,
normally ``CaClient``), checking what comes back, renewal at half-life with jitter,
retries with exponential backoff while the CA is down (the current certificate stays in
use until it actually expires), the trust bundle (re-read when its file changes; several
roots are fine: that is how a root is rotated), and the views the node agent socket
reports (``status``, ``describe``).

The data path reads ``cached(identity)`` (sync, no I/O); ``on_rotate`` callbacks tell the
proxy to rebuild its TLS contexts when a certificate (or the trust bundle) changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.errors import LocalStateError, NodeAgentError, PeerError
from nodeagent.identity.ca import is_self_signed, parse_spiffe_id, workload_csr
from nodeagent.identity.ca_client import CaUnreachable
from nodeagent.identity.tls import WorkloadCert

__all__ = [
    "BACKOFF_MAX_SECONDS",
    "BACKOFF_MIN_SECONDS",
    "CertificateStore",
    "RotateCallback",
    "Signer",
]

log = logging.getLogger(__name__)

BACKOFF_MIN_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
RENEW_FRACTION = 0.5
"""Renew when this fraction of the remaining lifetime (from issue) has passed..."""
RENEW_JITTER = 0.1
"""...give or take this fraction of it, so that many agents do not renew at once."""
MAX_SLEEP_SECONDS = 5.0
"""The renewal loop wakes at least this often (clock jumps, bundle file changes)."""

RotateCallback = Callable[[WorkloadCert], None]


class Signer(Protocol):
    """What the store needs of a CA client."""

    async def sign(self, csr_pem: bytes, ttl_seconds: int) -> list[bytes]: ...


@dataclass
class _Entry:
    """What the store knows about one identity."""

    identity: str
    cert: WorkloadCert | None = None
    chain: tuple[x509.Certificate, ...] = ()
    """As the CA returned it: the leaf first, the root last."""
    next_attempt: float = 0.0
    """When to renew (after a success) or retry (after a failure)."""
    failures: int = 0
    last_error: str = ""
    last_error_at: float = 0.0


def _ts(cert: x509.Certificate, which: str) -> float:
    dt = cert.not_valid_before_utc if which == "before" else cert.not_valid_after_utc
    return dt.timestamp()


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or ", ".join(_uris(cert)) or "<empty subject>"


def _cert_info(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": _ts(cert, "before"),
        "not_after": _ts(cert, "after"),
        "uris": _uris(cert),
    }


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _at(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class CertificateStore:
    """The workload certificates of one agent, fetched from the CA and renewed.

    ``client``: ``CaClient`` or anything with ``async sign(csr_pem, ttl_seconds)``
    returning the PEM chain. ``bundle_file``: the trust bundle (PEM, one or more roots);
    empty means "trust the roots the CA sends" (for tests and bootstrapping only).
    Use it from one event loop; start ``run()`` as a task to renew.
    """

    def __init__(
        self,
        client: Signer,
        trust_domain: str,
        lifetime_seconds: float = 86400,
        bundle_file: str = "",
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if lifetime_seconds <= 0:
            raise ValueError("lifetime_seconds must be positive")
        self._client = client
        self.trust_domain = trust_domain
        self.lifetime_seconds = float(lifetime_seconds)
        self.bundle_file = bundle_file
        self.on_rotate: list[RotateCallback] = []
        """Called with each new certificate, and with every current one when the trust
        bundle changes: rebuild the TLS contexts of that identity."""
        self._clock = clock
        self._rng = rng or random.Random()
        self._entries: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Task[WorkloadCert]] = {}
        self._wake = asyncio.Event()
        # How the CA is doing.
        self._ca_state = "unknown"
        self._unreachable_since = 0.0
        self._last_error = ""
        self._last_error_at = 0.0
        self._last_success_at = 0.0
        # The trust bundle file, cached by (mtime, size).
        self._bundle_stamp: tuple[int, int] | None = None
        self._bundle_pem = b""

    # -- the data path ------------------------------------------------------------------

    def cached(self, identity: str) -> WorkloadCert | None:
        """The current certificate of ``identity`` if it is still valid; no I/O."""
        entry = self._entries.get(identity)
        if entry is None or entry.cert is None:
            return None
        return entry.cert if self._clock() < entry.cert.not_after else None

    async def get(self, identity: str) -> WorkloadCert:
        """The certificate of ``identity``, asking the CA if there is no valid one.

        Concurrent callers for one identity share one request. While the CA is failing
        for this identity and its retry is not due, raises the last error at once
        (``PeerError``) instead of asking again.
        """
        cert = self.cached(identity)
        if cert is not None:
            return cert
        self._check_identity(identity)
        entry = self._entries.setdefault(identity, _Entry(identity))
        now = self._clock()
        if entry.failures and now < entry.next_attempt and identity not in self._inflight:
            raise PeerError(
                f"no certificate for {identity}: {entry.last_error} "
                f"(retrying in {entry.next_attempt - now:.0f}s)"
            )
        return await self._request(identity)

    # -- keeping the set of identities --------------------------------------------------

    async def ensure(self, identities: Iterable[str]) -> dict[str, str]:
        """Hold certificates for exactly ``identities``: fetch the missing ones, forget others.

        Does not raise when the CA fails: returns ``{identity: error}`` for those it could
        not get now (``run`` keeps retrying them with backoff).
        """
        wanted = set(identities)
        for identity in wanted:
            self._check_identity(identity)
        for gone in set(self._entries) - wanted:
            del self._entries[gone]
            log.info("certificate for %s no longer needed: forgotten", gone)
        for identity in wanted - set(self._entries):
            self._entries[identity] = _Entry(identity)
        missing = sorted(i for i in wanted if self.cached(i) is None)
        results = await asyncio.gather(*(self._request(i) for i in missing), return_exceptions=True)
        self._wake.set()
        errors: dict[str, str] = {}
        for identity, result in zip(missing, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                errors[identity] = str(result)
        return errors

    def identities(self) -> list[str]:
        return sorted(self._entries)

    # -- the trust bundle ----------------------------------------------------------------

    def trust_bundle(self) -> bytes:
        """The PEM roots to verify peers with: the bundle file (re-read when it changes).

        Without a bundle file: the roots the CA sent with our certificates.
        """
        if not self.bundle_file:
            roots: list[bytes] = []
            for entry in self._entries.values():
                if entry.chain and is_self_signed(entry.chain[-1]):
                    pem = _pem(entry.chain[-1])
                    if pem not in roots:
                        roots.append(pem)
            if not roots:
                raise LocalStateError("no trust bundle yet: no certificate came from the CA")
            return b"".join(roots)
        self._reload_bundle()
        return self._bundle_pem

    def _reload_bundle(self) -> bool:
        """Re-read the bundle file if it changed; True when its content changed."""
        try:
            st = os.stat(self.bundle_file)
        except OSError as e:
            if self._bundle_pem:
                log.error("trust bundle %s: %s; keeping the last good one", self.bundle_file, e)
                return False
            raise LocalStateError(f"cannot read the trust bundle {self.bundle_file}: {e}") from e
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._bundle_stamp:
            return False
        problem = ""
        try:
            with open(self.bundle_file, "rb") as f:
                data = f.read()
            certs = x509.load_pem_x509_certificates(data)
        except (OSError, ValueError) as e:
            problem = str(e)
            certs = []
        if not certs and not problem:
            problem = "no certificate in it"
        if problem:
            if self._bundle_pem:
                log.error(
                    "trust bundle %s is broken (%s); keeping the last good one",
                    self.bundle_file,
                    problem,
                )
                self._bundle_stamp = stamp
                return False
            raise LocalStateError(f"trust bundle {self.bundle_file}: {problem}")
        self._bundle_stamp = stamp
        new = b"".join(_pem(c) for c in certs)
        changed = new != self._bundle_pem
        if changed:
            log.info(
                "trust bundle %s loaded: %d root(s): %s",
                self.bundle_file,
                len(certs),
                "; ".join(_name(c) for c in certs),
            )
        self._bundle_pem = new
        return changed

    def _bundle_certs(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.trust_bundle())

    # -- renewal -------------------------------------------------------------------------

    async def run(self) -> None:
        """Renew each certificate at half-life (± jitter); retry failures with backoff.

        Runs until cancelled; also notices trust bundle changes (``on_rotate``).
        """
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                self._check_bundle()
                now = self._clock()
                for entry in list(self._entries.values()):
                    if entry.identity in self._inflight or entry.next_attempt > now:
                        continue
                    task = asyncio.get_running_loop().create_task(self._renew(entry.identity))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                waits = [
                    e.next_attempt - now
                    for e in self._entries.values()
                    if e.identity not in self._inflight
                ]
                timeout = min([MAX_SLEEP_SECONDS, *waits])
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.01, timeout))
        finally:
            for task in tasks:
                task.cancel()

    async def _renew(self, identity: str) -> None:
        with contextlib.suppress(NodeAgentError):
            await self._request(identity)  # failures are recorded and logged there

    def _check_bundle(self) -> None:
        if not self.bundle_file:
            return
        try:
            changed = self._reload_bundle()
        except LocalStateError as e:
            log.error("%s", e)
            return
        if changed and self._bundle_stamp is not None:
            for entry in self._entries.values():
                if entry.cert is not None:
                    self._notify(entry.cert)

    # -- one request ---------------------------------------------------------------------

    def _check_identity(self, identity: str) -> None:
        try:
            td, _ = parse_spiffe_id(identity)
        except ValueError as e:
            raise LocalStateError(f"cannot request a certificate: {e}") from e
        if td != self.trust_domain:
            raise LocalStateError(
                f"cannot request a certificate for {identity}: not in trust domain "
                f"{self.trust_domain!r}"
            )

    async def _request(self, identity: str) -> WorkloadCert:
        task = self._inflight.get(identity)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(identity))
            self._inflight[identity] = task

            def done(t: asyncio.Task[WorkloadCert]) -> None:
                if self._inflight.get(identity) is t:
                    del self._inflight[identity]
                if not t.cancelled():
                    t.exception()  # retrieved: the callers got it through shield

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _fetch(self, identity: str) -> WorkloadCert:
        csr_pem, key = workload_csr(identity)
        try:
            pems = await self._client.sign(csr_pem, math.ceil(self.lifetime_seconds))
            cert, chain = self._accept(identity, key, pems)
        except NodeAgentError as e:
            self._failed(identity, e)
            raise
        except Exception as e:
            error = PeerError(f"asking the CA for {identity} failed: {type(e).__name__}: {e}")
            self._failed(identity, error)
            raise error from e
        self._succeeded(identity, cert, chain)
        return cert

    def _accept(
        self, identity: str, key: ec.EllipticCurvePrivateKey, pems: list[bytes]
    ) -> tuple[WorkloadCert, tuple[x509.Certificate, ...]]:
        """Check the CA's answer; the ``WorkloadCert`` and the chain as received."""
        try:
            chain = tuple(x509.load_pem_x509_certificates(b"\n".join(pems)))
        except ValueError as e:
            raise PeerError(f"the CA sent something that is not PEM certificates: {e}") from e
        if not chain:
            raise PeerError("the CA sent an empty certificate chain")
        leaf = chain[0]
        fmt = serialization.PublicFormat.SubjectPublicKeyInfo
        enc = serialization.Encoding.DER
        if leaf.public_key().public_bytes(enc, fmt) != key.public_key().public_bytes(enc, fmt):
            raise PeerError(f"the CA's certificate for {identity} is not for the key we sent")
        if _uris(leaf) != [identity]:
            raise PeerError(
                f"the CA's certificate for {identity} carries the URI SANs {_uris(leaf)}"
            )
        now = self._clock()
        if _ts(leaf, "after") <= now:
            raise PeerError(
                f"the CA's certificate for {identity} expired at {_at(_ts(leaf, 'after'))}: "
                "is the CA's clock (or ours) wrong?"
            )
        for child, parent in itertools.pairwise(chain):
            if not _issued_by(child, parent):
                raise PeerError(
                    f"the CA's chain for {identity} is broken: {_name(child)} is not signed "
                    f"by the next certificate, {_name(parent)}"
                )
        if self.bundle_file:
            roots = self._bundle_certs()
            top = chain[-1]
            if not any(top == r or _issued_by(top, r) for r in roots):
                raise PeerError(
                    f"the CA's chain for {identity} ends at {_name(top)}, which is not signed "
                    f"by a root of the trust bundle {self.bundle_file}: add the CA's root to "
                    "the bundle (root rotation) or fix the CA"
                )
        body = [c for c in chain[1:] if not is_self_signed(c)]
        cert = WorkloadCert(
            identity=identity,
            chain_pem=b"".join(_pem(c) for c in (leaf, *body)),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            not_before=_ts(leaf, "before"),
            not_after=_ts(leaf, "after"),
            serial=format(leaf.serial_number, "x"),
        )
        return cert, chain

    def _succeeded(
        self, identity: str, cert: WorkloadCert, chain: tuple[x509.Certificate, ...]
    ) -> None:
        now = self._clock()
        self._ca_state = "reachable"
        self._unreachable_since = 0.0
        self._last_success_at = now
        entry = self._entries.get(identity)
        if entry is None:  # forgotten meanwhile: the caller still gets its certificate
            return
        fraction = RENEW_FRACTION * self._rng.uniform(1 - RENEW_JITTER, 1 + RENEW_JITTER)
        entry.cert = cert
        entry.chain = chain
        entry.failures = 0
        entry.last_error = ""
        entry.last_error_at = 0.0
        entry.next_attempt = now + max(0.0, cert.not_after - now) * fraction
        log.info(
            "certificate for %s issued: serial %s, valid until %s, renewal in %.0fs",
            identity,
            cert.serial,
            _at(cert.not_after),
            entry.next_attempt - now,
        )
        self._wake.set()
        self._notify(cert)

    def _failed(self, identity: str, error: NodeAgentError) -> None:
        now = self._clock()
        self._last_error = str(error)
        self._last_error_at = now
        if isinstance(error, CaUnreachable):
            if self._ca_state != "unreachable":
                self._unreachable_since = now
            self._ca_state = "unreachable"
        else:
            self._ca_state = "reachable"
            self._unreachable_since = 0.0
        entry = self._entries.get(identity)
        if entry is None:
            return
        entry.failures += 1
        backoff = min(BACKOFF_MAX_SECONDS, BACKOFF_MIN_SECONDS * 2 ** (entry.failures - 1))
        entry.next_attempt = now + backoff
        entry.last_error = str(error)
        entry.last_error_at = now
        current = entry.cert if entry.cert is not None and now < entry.cert.not_after else None
        keeping = (
            f"keeping serial {current.serial}, valid until {_at(current.not_after)}"
            if current is not None
            else "no valid certificate for it"
        )
        log.warning(
            "certificate for %s: %s; %s; retry %d in %.0fs",
            identity,
            error,
            keeping,
            entry.failures,
            backoff,
        )
        self._wake.set()

    def _notify(self, cert: WorkloadCert) -> None:
        for callback in list(self.on_rotate):
            try:
                callback(cert)
            except Exception:
                log.exception("on_rotate callback failed for %s", cert.identity)

    # -- views ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """How the CA is doing: ``state`` (unknown/reachable/unreachable), ``reachable``,
        ``address``, ``last_error`` (+ ``_at``), ``unreachable_since``, ``last_success_at``,
        ``next_renewal_at`` (the next renewal or retry, 0 if none)."""
        pending = [e.next_attempt for e in self._entries.values() if e.next_attempt > 0]
        return {
            "state": self._ca_state,
            "reachable": self._ca_state != "unreachable",
            "address": str(getattr(self._client, "target", "") or ""),
            "last_error": self._last_error,
            "last_error_at": self._last_error_at,
            "unreachable_since": self._unreachable_since,
            "last_success_at": self._last_success_at,
            "next_renewal_at": min(pending, default=0.0),
        }

    def describe(self) -> list[dict[str, Any]]:
        """Per identity: ``identity``, ``serial``, ``not_before``, ``not_after``,
        ``renews_in_seconds``, ``state`` (valid/renewing/expired/pending), ``last_error``,
        and ``chain`` (leaf first, root last: subject, issuer, serial, not_before,
        not_after, uris)."""
        now = self._clock()
        out: list[dict[str, Any]] = []
        for identity in sorted(self._entries):
            e = self._entries[identity]
            c = e.cert
            if c is None:
                state = "pending"
            elif now >= c.not_after:
                state = "expired"
            elif e.failures:
                state = "renewing"
            else:
                state = "valid"
            out.append(
                {
                    "identity": identity,
                    "serial": c.serial if c else "",
                    "not_before": c.not_before if c else 0.0,
                    "not_after": c.not_after if c else 0.0,
                    "renews_in_seconds": e.next_attempt - now,
                    "state": state,
                    "last_error": e.last_error,
                    "chain": [_cert_info(x) for x in e.chain],
                }
            )
        return out
