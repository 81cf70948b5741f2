"""One metrics view over every process: the main process's registry with the worker
processes' samples added in (``MergedRegistry``), so that ``/metrics`` and ``ctl
metrics`` show the node as one agent. Counters, histograms and gauges of the same name
and labels are summed (a node's requests, whichever process served them)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import Metric
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Sample


def merge(families: Iterable[Iterable[Metric]]) -> list[Metric]:
    """The families of several processes as one: same family name, same sample name
    and labels → one sample, summed; the first process's order and help kept."""
    out: dict[str, Metric] = {}
    index: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], int]] = {}
    for group in families:
        for fam in group:
            mine = out.get(fam.name)
            if mine is None:
                mine = out[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                index[fam.name] = {}
            at = index[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                i = at.get(key)
                if i is None:
                    at[key] = len(mine.samples)
                    mine.samples.append(Sample(s.name, dict(s.labels), s.value, s.timestamp))
                else:
                    old = mine.samples[i]
                    mine.samples[i] = old._replace(value=old.value + s.value)
    return list(out.values())


class MergedRegistry(CollectorRegistry):
    """``main``'s collectors, and the workers' families ``others`` returns, as one
    registry (what ``generate_latest`` reads)."""

    def __init__(self, main: CollectorRegistry, others: Callable[[], list[list[Metric]]]):
        super().__init__(auto_describe=False)
        self.main = main
        self.others = others

    def collect(self) -> Iterator[Metric]:
        others = self.others()
        if not others:
            yield from self.main.collect()
            return
        yield from merge([list(self.main.collect()), *others])
