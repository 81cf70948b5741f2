"""A config directory mounted from a ConfigMap, as kubelet lays it out: each key is read
once (through its top-level link, never through ``..data`` or the timestamped directory),
and the watcher loads the new content when kubelet swaps ``..data`` atomically."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from nodeagent.control.files import ConfigWatcher, LoadedConfig, load_directory


def service(port: int) -> str:
    return (
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n"
        f"spec: {{clusterIP: 10.96.0.20, ports: [{{port: {port}}}]}}\n"
    )


def kubelet_write(volume: Path, files: dict[str, str], stamp: str) -> None:
    """What kubelet's AtomicWriter does on each ConfigMap update: write the keys into a new
    ``..<timestamp>`` directory, point ``..data_tmp`` at it, rename that over ``..data``,
    link each new key as ``key -> ..data/key``, then remove the old directory."""
    data = volume / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    ts = volume / f"..{stamp}"
    ts.mkdir()
    for name, text in files.items():
        (ts / name).write_text(text)
    tmp = volume / "..data_tmp"
    tmp.symlink_to(ts.name)
    os.rename(tmp, data)
    for name in files:
        link = volume / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    if old is not None:
        shutil.rmtree(volume / old)


def test_each_key_is_read_once(tmp_path: Path) -> None:
    kubelet_write(
        tmp_path,
        {
            "mesh.yaml": service(80),
            "more.yml": service(81).replace("web", "api").replace(".20", ".21"),
        },
        "2026_12_06_08_00_00.123456789",
    )
    (tmp_path / ".hidden.yaml").write_text("not: [yaml")  # an editor's swap file, say
    loaded = load_directory(tmp_path)
    assert loaded.snapshot.sources == (str(tmp_path / "mesh.yaml"), str(tmp_path / "more.yml"))
    assert sorted(s.key for s in loaded.snapshot.services) == ["shop/api", "shop/web"]


def test_the_watcher_loads_what_kubelet_swaps_in(tmp_path: Path) -> None:
    kubelet_write(tmp_path, {"mesh.yaml": service(80)}, "2026_12_06_08_00_00.123456789")
    first = tmp_path / "..2026_12_06_08_00_00.123456789" / "mesh.yaml"
    before = first.stat()
    dir_before = tmp_path.stat()
    seen: list[LoadedConfig] = []
    watcher = ConfigWatcher(
        directory=tmp_path, pods_file=None, on_update=seen.append, interval=0.02
    )
    watcher.load_once()

    async def swap_and_wait() -> LoadedConfig:
        task = asyncio.create_task(watcher.run())
        try:
            await asyncio.sleep(0.1)
            # same size and times as the old file, and the directory's times put back:
            # only where the links lead tells the new content from the old
            kubelet_write(tmp_path, {"mesh.yaml": service(81)}, "2026_12_06_08_05_00.987654321")
            os.utime(
                tmp_path / "..2026_12_06_08_05_00.987654321" / "mesh.yaml",
                ns=(before.st_atime_ns, before.st_mtime_ns),
            )
            os.utime(tmp_path, ns=(dir_before.st_atime_ns, dir_before.st_mtime_ns))
            for _ in range(250):
                if seen:
                    return seen[-1]
                await asyncio.sleep(0.02)
            raise AssertionError("the watcher did not load the swapped config within 5 s")
        finally:
            task.cancel()

    loaded = asyncio.run(swap_and_wait())
    (svc,) = loaded.snapshot.services
    assert [p.port for p in svc.ports] == [81]
    assert loaded.snapshot.version == 2
    assert watcher.last_error == ""
