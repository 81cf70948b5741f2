"""One kind's list-and-watch of the Kubernetes API, kept as a table of objects.

``KindWatch`` lists the kind, then watches from the list's resourceVersion with
bookmarks; a watch the server ends (``timeoutSeconds``) is resumed from the last
resourceVersion seen, a 410 Gone (answer or ERROR event) relists, and any other failure
(the API server away, a refusal) backs off, exponentially with jitter up to a cap, while
the table keeps what it held. A kind the server does not serve (404: its CRD is not
installed) is listed again now and then and reads as empty meanwhile.

Each object is parsed once, when it arrives, by the ``parse`` it is given; a malformed
object is logged and kept out (or, when an earlier version of it was good, that version
stays) with a warning naming the object and the field. Every change calls ``changed``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodeagent.control.kubeclient import MALFORMED, ApiGone, ApiStatusError, KubeClient, Resource
from nodeagent.control.schema import shorten
from nodeagent.errors import ConfigError
from nodeagent.model.status import WatchStatus

log = logging.getLogger(__name__)

Pair = tuple[dict[str, Any], object]
Parse = Callable[[dict[str, Any], str], tuple[Pair | None, list[ConfigError], list[str]]]
"""``control.files.parse_object``'s signature: (pair or None, errors, warnings)."""

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
QUICK_END = 1.0
"""A watch the server ends sooner than this (seconds) is resumed after a back-off."""
UNSERVED_RETRY = 60.0
"""How often a kind the API server does not serve is asked for again (a CRD installed
later is picked up)."""


def backoff_delay(attempt: int, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Exponential in ``attempt`` (0, 1, …), capped, with jitter: many agents that lost
    the API server at once do not come back in step."""
    return min(cap, base * 2.0 ** min(attempt, 30)) * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Entry:
    """One object of the table: the raw object as the API gave it last, the validated
    pair the snapshot uses (None: left out) and what is worth a warning."""

    raw: dict[str, Any]
    pair: Pair | None
    warning: str = ""
    errors: tuple[ConfigError, ...] = ()
    """Why the object's latest version was not taken (malformed), each naming the field."""


def object_key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return "?"
    name, ns = meta.get("name", "?"), meta.get("namespace")
    name = name if isinstance(name, str) else shorten(name)  # never a huge key
    return f"{ns if isinstance(ns, str) else shorten(ns)}/{name}" if ns else name


def _version(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata")
    return str(meta.get("resourceVersion", "")) if isinstance(meta, dict) else ""


def describe_error(error: BaseException) -> str:
    if isinstance(error, ApiStatusError):
        return f"the API server answered {error}"
    if isinstance(error, TimeoutError):  # ours say how long, or that keepalive gave up
        why = f" ({error})" if str(error) else ""
        return f"the API server did not answer in time{why}"
    if isinstance(error, OSError):
        return f"cannot reach the API server: {error or type(error).__name__}"
    return f"{type(error).__name__}: {error}"


class KindWatch:
    """The list-and-watch of one ``Resource``, with its table and its status."""

    def __init__(
        self,
        client: KubeClient,
        resource: Resource,
        *,
        parse: Parse | None,
        changed: Callable[[], None],
        field_selector: str = "",
        timeout_seconds: int = 300,
        source: str = "kubernetes",
    ) -> None:
        self.client = client
        self.resource = resource
        self.parse = parse
        """None: the objects are kept raw (EndpointSlices, read by the source itself)."""
        self.changed = changed
        self.field_selector = field_selector
        self.timeout_seconds = timeout_seconds
        self.source = source
        self.items: dict[str, Entry] = {}
        self.state = "listing"
        self.served = True
        self.resource_version = ""
        self.last_event_at = 0.0
        self.waiting_since = 0.0
        """Monotonic arrival of the oldest change no served snapshot holds yet (0: none)."""
        self.lag = 0.0
        self.last_error = ""
        self.relists = 0
        self.malformed = 0
        """Watch lines skipped as no event (not JSON, nested too deep, a huge integer)."""
        self._malformed_last = ""
        self._lists = 0
        self._changed_at = 0.0

    # -- status ------------------------------------------------------------------------
    def status(self) -> WatchStatus:
        return WatchStatus(
            kind=str(self.resource),
            state=self.state,
            resource_version=self.resource_version,
            objects=len(self.items),
            last_event_at=self.last_event_at,
            lag_seconds=self.lag,
            last_error=self.last_error,
            relists=self.relists,
        )

    def served_at(self, now: float, collected_at: float) -> None:
        """A snapshot holding the changes up to ``collected_at`` serves from ``now``
        (both monotonic): the lag of the oldest change that waited for it."""
        if self.waiting_since and self.waiting_since <= collected_at:
            self.lag = max(0.0, now - self.waiting_since)
            # a change that came while the snapshot was built waits for the next one
            self.waiting_since = collected_at if self._changed_at > collected_at else 0.0

    def warnings(self) -> list[str]:
        out = [e.warning for e in self.items.values() if e.warning]
        if self.malformed:
            out.append(
                f"{self.resource}: {self.malformed} malformed watch event(s) skipped, "
                f"the last: {self._malformed_last}"
            )
        if not self.served:
            out.append(
                f"{self.resource}: the API server does not serve this kind (is its "
                f"CustomResourceDefinition installed?): none are read"
            )
        return out

    # -- the table ---------------------------------------------------------------------
    def _note_change(self) -> None:
        self.last_event_at = time.time()
        self._changed_at = time.monotonic()
        if not self.waiting_since:
            self.waiting_since = self._changed_at
        self.changed()

    def _entry(self, obj: dict[str, Any], old: Entry | None) -> Entry:
        meta = obj.get("metadata")
        if isinstance(meta, dict):  # often half an object's size, and of no use here
            meta.pop("managedFields", None)
        if self.parse is None:
            return Entry(obj, None)
        pair, errors, warnings = self.parse(obj, self.source)
        if pair is not None and not errors:
            return Entry(obj, pair, "; ".join(warnings))
        what = "; ".join(str(e) for e in errors) or "; ".join(warnings)
        if not errors:  # a kind or object the mesh does not serve: skipped quietly
            return Entry(obj, None, what)
        if old is not None and old.pair is not None:
            note = f"{what} (its previous version keeps serving)"
            log.warning("%s %s rejected: %s", self.resource, object_key(obj), note)
            return Entry(obj, old.pair, note, tuple(errors))
        log.warning("%s %s skipped: %s", self.resource, object_key(obj), what)
        return Entry(obj, None, f"{what} (skipped)", tuple(errors))

    def apply(self, kind: str, obj: dict[str, Any]) -> None:
        """One watch event (ADDED, MODIFIED, DELETED, BOOKMARK) into the table."""
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        assert isinstance(meta, dict)
        rv = meta.get("resourceVersion")
        if isinstance(rv, str) and rv:
            self.resource_version = rv
        if kind == "BOOKMARK":
            self.last_event_at = time.time()
            return
        if kind == MALFORMED:
            self.malformed += 1
            self._malformed_last = f"{obj.get('error')} ({obj.get('line', '')[:80]!r}…)"
            log.warning("%s: watch event skipped: %s", self.resource, self._malformed_last)
            return
        key = object_key(obj)
        if kind == "DELETED":
            self.items.pop(key, None)
        elif kind in ("ADDED", "MODIFIED"):
            self.items[key] = self._entry(obj, self.items.get(key))
        else:
            log.warning("%s: unknown watch event type %r, ignored", self.resource, kind)
            return
        self._note_change()

    def replace(self, objects: list[dict[str, Any]], resource_version: str) -> None:
        """A whole list: the table becomes exactly ``objects`` (what was deleted while no
        watch ran goes now)."""
        old = self.items
        self.items = {}
        changed = len(objects) != len(old)
        for obj in objects:
            key = object_key(obj)
            was = old.get(key)
            if was is not None and _version(was.raw) == _version(obj) and _version(obj):
                self.items[key] = was  # unchanged since the last list or event
            else:
                self.items[key] = self._entry(obj, was)
                changed = True
        self.resource_version = resource_version
        if changed:  # a relist that finds nothing new makes no snapshot
            self._note_change()

    # -- the loop ----------------------------------------------------------------------
    async def list_once(self) -> None:
        """List the kind now (``ApiStatusError``, transport errors raise; 404 marks the
        kind unserved and empties the table)."""
        self.state = "listing"
        try:
            objects, rv = await self.client.list(self.resource, field_selector=self.field_selector)
        except ApiStatusError as e:
            if e.code != 404:
                raise
            if self.served or self.items:
                log.warning("%s: not served by the API server (404): none are read", self.resource)
            self.served = False
            self.state = "unserved"
            if self.items:
                self.items = {}
                self._note_change()
            return
        if self._lists:
            self.relists += 1
        self._lists += 1
        self.served = True
        self.replace(objects, rv)
        self.last_error = ""

    async def _watch_once(self) -> None:
        self.state = "watching"
        async for kind, obj in self.client.watch(
            self.resource,
            self.resource_version,
            timeout_seconds=self.timeout_seconds,
            field_selector=self.field_selector,
        ):
            self.apply(kind, obj)
            self.last_error = ""

    async def run(self, *, listed: bool = False) -> None:
        """List (unless ``listed``: ``list_once`` just ran) and watch, for ever."""
        need_list = not listed
        attempt = 0
        while True:
            try:
                if need_list:
                    await self.list_once()
                    need_list = False
                if not self.served:
                    await asyncio.sleep(UNSERVED_RETRY)
                    need_list = True
                    continue
                started = time.monotonic()
                await self._watch_once()  # returns when the server ends it: resume
                if time.monotonic() - started > QUICK_END:
                    attempt = 0
                else:  # a server ending every watch at once is not asked in a tight loop
                    await asyncio.sleep(backoff_delay(attempt))
                    attempt += 1
            except ApiGone as e:
                log.info(
                    "%s: resourceVersion %s is gone (%s): relisting",
                    self.resource,
                    self.resource_version,
                    e,
                )
                need_list = True
                attempt = 0
            except Exception as e:  # whatever failed, the watch retries; the snapshot serves
                self.state = "backoff"
                self.last_error = describe_error(e)
                if isinstance(e, ApiStatusError) and e.code == 404:
                    need_list = True  # the CRD went away: the list says so, and empties it
                delay = backoff_delay(attempt)
                attempt += 1
                # the first failure of a run is a warning; the retries after it, info
                log.log(
                    logging.WARNING if attempt == 1 else logging.INFO,
                    "%s: %s; retrying in %.1fs (the last snapshot keeps serving)",
                    self.resource,
                    self.last_error,
                    delay,
                )
                await asyncio.sleep(delay)
