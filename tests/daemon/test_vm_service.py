"""The host's VM service over libvirt's test:///default driver: launch, monitor, resize, delete.

The template comes from a fake TemplateSource (the swarm path is tested in test_node.py); it is
a real file, so the tests check the template is never written, moved or deleted.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import blake3
import pytest
import trio
import trio.testing
from vmswarm.daemon.config_files import ConfigError, load_flavors
from vmswarm.daemon.instances import InstanceStore
from vmswarm.daemon.libvirt_launcher import LibvirtLauncher
from vmswarm.daemon.node import Node, NodeConfig
from vmswarm.daemon.rpc import Notifier, RpcClient, RpcError, serve_rpc
from vmswarm.daemon.vm_service import (
    FetchingNode,
    NodeTemplates,
    ReadyTemplate,
    StreamingTemplate,
    VmService,
    boot_problem,
    cpu_utilisation,
    template_virtual_size,
)
from vmswarm.swarm.flavors import GIB, MIB, Flavor, default_flavors
from vmswarm.swarm.imageformat import ImageFormat

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
pytestmark = needs_qemu_img

TEMPLATE_ID = bytes(range(32))


@dataclass
class FakeTemplates:
    """A TemplateSource over one local file; counts fetches."""

    path: Path
    name: str = "tinylinux"
    version: str = "1"
    fetches: int = 0
    notices: list[str] = field(default_factory=list)

    async def ready_template(
        self,
        name: str | None,
        version: str | None,
        template_id: bytes | None,
        notifier: Notifier,
    ) -> ReadyTemplate:
        if name not in (None, self.name) or template_id not in (None, TEMPLATE_ID):
            raise RpcError("unknown_template", f"no template {name!r}")
        self.fetches += 1
        await notifier.notify("progress", {"done_bytes": 1, "total_bytes": 1})
        return ReadyTemplate(
            TEMPLATE_ID,
            self.name,
            self.version,
            self.path,
            ImageFormat.RAW,
            self.path.stat().st_size,
        )

    async def stream_template(
        self,
        name: str | None,
        version: str | None,
        template_id: bytes | None,
        notifier: Notifier,
    ) -> StreamingTemplate:
        # Already complete: a streaming launch boots from the file like any other.
        ready = await self.ready_template(name, version, template_id, notifier)
        return StreamingTemplate(ready, None, self.path.read_bytes()[:512])

    async def resume_stream(self, template_id: bytes) -> Path | None:
        return None

    async def wait_complete(self, template_id: bytes) -> Path:
        return self.path


def silent() -> Notifier:
    async def drop(event: str, data: dict[str, Any]) -> None:
        pass

    return Notifier(drop)


def write_template(path: Path, bootable: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sector = bytearray(512)
    if bootable:
        sector[510:] = b"\x55\xaa"
    path.write_bytes(bytes(sector) + b"\x07" * (1 << 20))
    return path


def digest(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


@dataclass
class Host:
    service: VmService
    templates: FakeTemplates
    data_dir: Path
    changes: list[int]

    async def launch(self, flavor: str = "tiny", **params: Any) -> dict[str, Any]:
        return await self.service.launch(
            name=params.get("name", "tinylinux"),
            version=params.get("version"),
            template_id=params.get("template_id"),
            flavor_name=flavor,
            vm_name=params.get("vm_name"),
            notifier=silent(),
        )

    def vm_dirs(self) -> list[str]:
        return sorted(p.name for p in (self.data_dir / "vms").iterdir() if p.is_dir())


@asynccontextmanager
async def host(
    tmp_path: Path,
    *,
    uri: str = "test:///default",
    bootable: bool = True,
    flavors: dict[str, Flavor] | None = None,
    cpu_ratio: float = 4.0,
) -> AsyncIterator[Host]:
    template = write_template(tmp_path / "templates" / "t.img", bootable)
    templates = FakeTemplates(template)
    changes: list[int] = []
    launcher = LibvirtLauncher(uri)
    service = VmService(
        launcher,
        tmp_path / "data",
        templates,
        flavors or default_flavors(),
        host_label=lambda: "10.0.0.7:7881",
        cpu_allocation_ratio=cpu_ratio,
        stop_timeout=2.0,
        sample_interval=0.2,
        fresh_sample=0.0,
        on_change=lambda: changes.append(1),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        try:
            yield Host(service, templates, tmp_path / "data", changes)
        finally:
            for instance in list(service.store):
                await service.delete(instance.vm_id)
            nursery.cancel_scope.cancel()
    launcher.close()


async def code_of(action: Callable[[], Any]) -> str:
    with pytest.raises(RpcError) as caught:
        await action()
    return caught.value.code


async def test_launch_monitor_stop_start_delete(tmp_path: Path) -> None:
    async with host(tmp_path) as h:
        template = h.templates.path
        before = digest(template)
        changes = len(h.changes)
        result = await h.launch("tiny")
        assert len(h.changes) > changes  # the node announces its new capacity soon
        assert result["host"] == "10.0.0.7:7881"
        assert result["template_id"] == TEMPLATE_ID.hex()
        assert result["domain"].startswith("vmswarm-tinylinux-")
        assert result["seconds_fetch"] >= 0 and result["seconds_boot"] >= 0
        vm_id = result["vm_id"]
        assert template.stat().st_mode & 0o777 == 0o444  # the template is read-only now

        listing = await h.service.vms()
        (vm,) = listing["vms"]
        assert vm["vm_id"] == vm_id and vm["state"] == "running"
        assert (vm["vcpus"], vm["memory"]) == (1, 128 * MIB)
        assert vm["flavor"] == "tiny" and vm["template"] == "tinylinux:1"
        assert 0.0 <= vm["cpu_utilisation"] <= 1.0
        for counter in ("net_rx_bytes", "net_tx_bytes", "disk_read_bytes", "disk_write_bytes"):
            assert vm[counter] >= 0
        assert await trio.Path(vm["overlay"]).exists()
        assert listing["capacity"]["vcpus_used"] == 1
        assert listing["capacity"]["memory_used"] == 128 * MIB

        stopped = await h.service.stop(vm_id)
        assert stopped["state"] == "shutoff"
        capacity = h.service.capacity()
        assert capacity is not None and capacity["vcpus_used"] == 0
        started = await h.service.start(vm_id[:6])  # an id prefix is enough
        assert started["state"] == "running"

        deleted = await h.service.delete(vm_id)
        assert deleted["deleted"] is True
        assert (await h.service.vms())["vms"] == []
        assert not h.service.launcher.exists(result["domain"])
        assert h.vm_dirs() == []
        assert template.exists() and digest(template) == before


async def test_records_survive_a_restart(tmp_path: Path) -> None:
    async with host(tmp_path) as h:
        result = await h.launch("small", vm_name="keeper")
        store = InstanceStore(h.data_dir)
        assert [i.name for i in store] == ["keeper"]
        assert store.get(result["vm_id"]) is not None


async def test_live_resize(tmp_path: Path) -> None:
    async with host(tmp_path) as h:
        vm_id = (await h.launch("tiny"))["vm_id"]
        resized = await h.service.resize(vm_id, vcpus=2, memory=256 * MIB)
        assert resized == {
            "vm_id": vm_id,
            "domain": resized["domain"],
            "vcpus": 2,
            "memory": 256 * MIB,
            "live": True,
        }
        (vm,) = (await h.service.vms())["vms"]
        assert (vm["vcpus"], vm["memory"]) == (2, 256 * MIB)
        capacity = h.service.capacity()
        assert capacity is not None and capacity["vcpus_used"] == 2
        with pytest.raises(RpcError, match="max_vcpus") as caught:
            await h.service.resize(vm_id, vcpus=3)
        assert caught.value.code == "cannot_resize"
        with pytest.raises(RpcError, match="max_memory") as caught:
            await h.service.resize(vm_id, memory=1 * GIB)
        assert caught.value.code == "cannot_resize"
        with pytest.raises(ValueError, match="vcpus or memory"):
            await h.service.resize(vm_id)


async def test_resize_beyond_the_hosts_free_capacity_says_so(tmp_path: Path) -> None:
    big = {"big": Flavor("big", vcpus=8, memory=64 * MIB, disk=0, max_vcpus=32)}
    async with host(tmp_path, flavors=big, cpu_ratio=1.0) as h:  # the test driver has 16 CPUs
        vm_id = (await h.launch("big"))["vm_id"]
        with pytest.raises(RpcError, match="17 vCPUs wanted, 16 free") as caught:
            await h.service.resize(vm_id, vcpus=17)
        assert caught.value.code == "cannot_resize"


async def test_bad_requests_change_nothing(tmp_path: Path) -> None:
    async with host(tmp_path) as h:
        await h.launch("tiny", vm_name="taken")
        before = h.vm_dirs()
        assert await code_of(lambda: h.launch("huge")) == "unknown_flavor"
        assert await code_of(lambda: h.launch(name="nosuch")) == "unknown_template"
        assert await code_of(lambda: h.launch(vm_name="taken")) == "name_taken"
        assert await code_of(lambda: h.service.stop("no-such-vm")) == "unknown_vm"
        assert await code_of(lambda: h.service.delete("no-such-vm")) == "unknown_vm"
        assert h.vm_dirs() == before
        assert len(h.service.store) == 1


async def test_unknown_flavor_lists_the_known_ones(tmp_path: Path) -> None:
    async with host(tmp_path) as h:
        with pytest.raises(RpcError, match="known flavors: tiny, small, medium"):
            await h.launch("xl")
        assert h.templates.fetches == 0  # nothing fetched for a request that cannot run


async def test_no_capacity(tmp_path: Path) -> None:
    flavors = {"half": Flavor("half", vcpus=8, memory=64 * MIB, disk=0)}
    async with host(tmp_path, flavors=flavors, cpu_ratio=1.0) as h:  # 16 CPUs: two fit
        await h.launch("half")
        await h.launch("half")
        with pytest.raises(RpcError, match="8 vCPUs wanted, 0 free") as caught:
            await h.launch("half")
        assert caught.value.code == "no_capacity"
        assert len(h.vm_dirs()) == 2


async def test_concurrent_launches_never_overbook(tmp_path: Path) -> None:
    flavors = {"half": Flavor("half", vcpus=8, memory=64 * MIB, disk=0)}
    async with host(tmp_path, flavors=flavors, cpu_ratio=1.0) as h:  # 16 CPUs: two fit
        outcomes: list[str] = []

        async def one() -> None:
            try:
                await h.launch("half")
                outcomes.append("ok")
            except RpcError as exc:
                outcomes.append(exc.code)

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one)
        assert sorted(outcomes) == ["no_capacity", "no_capacity", "ok", "ok"]
        assert len(h.service.store) == 2 and len(h.vm_dirs()) == 2


async def test_not_bootable_template(tmp_path: Path) -> None:
    async with host(tmp_path, bootable=False) as h:
        with pytest.raises(RpcError, match="no boot sector") as caught:
            await h.launch("tiny")
        assert caught.value.code == "not_bootable"
        assert h.vm_dirs() == [] and len(h.service.store) == 0


async def test_unreachable_libvirt(tmp_path: Path) -> None:
    async with host(tmp_path, uri="test:///nonexistent/vmswarm-nothing.xml") as h:
        with pytest.raises(RpcError, match="cannot connect to libvirt") as caught:
            await h.launch("tiny")
        assert caught.value.code == "libvirt_unreachable"
        assert h.templates.fetches == 0
        assert h.service.capacity() is None
        assert h.vm_dirs() == []


async def test_a_domain_lost_by_libvirt_is_redefined_on_start(tmp_path: Path) -> None:
    async with host(tmp_path) as h:
        result = await h.launch("tiny")
        launcher = h.service.launcher
        launcher.destroy(result["domain"])
        launcher.undefine(result["domain"])
        (vm,) = (await h.service.vms())["vms"]
        assert vm["state"] == "missing"
        assert (await h.service.start(result["vm_id"]))["state"] == "running"


async def test_rpc_handlers(tmp_path: Path) -> None:
    async with host(tmp_path) as h:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_rpc, server_stream, h.service.handlers())
            client = RpcClient(client_stream)
            notices: list[str] = []
            launched = await client.call(
                "launch",
                {"name": "tinylinux", "version": None, "flavor": "tiny", "vm_name": "rpc-vm"},
                lambda event, data: notices.append(event),
            )
            assert "progress" in notices and "phase" in notices
            assert set(launched) >= {
                "vm_id",
                "domain",
                "template_id",
                "seconds_fetch",
                "seconds_boot",
                "host",
            }
            listed = await client.call("vms", {})
            assert [vm["name"] for vm in listed["vms"]] == ["rpc-vm"]
            resized = await client.call(
                "vm_resize", {"vm_id": "rpc-vm", "vcpus": 2, "memory": None}
            )
            assert resized["vcpus"] == 2
            assert (await client.call("vm_stop", {"vm_id": "rpc-vm"}))["state"] == "shutoff"
            assert (await client.call("vm_start", {"vm_id": "rpc-vm"}))["state"] == "running"
            flavors = await client.call("flavors", {})
            assert [f["name"] for f in flavors["flavors"]] == ["tiny", "small", "medium"]
            capacity = await client.call("capacity", {})
            assert capacity["capacity"]["vcpus_used"] == 2
            with pytest.raises(RpcError) as caught:
                await client.call("vm_resize", {"vm_id": "rpc-vm", "vcpus": "many"})
            assert caught.value.code == "bad_request"
            with pytest.raises(RpcError) as caught:
                await client.call("launch", {"name": "tinylinux"})
            assert caught.value.code == "bad_request"  # no flavor
            assert (await client.call("vm_delete", {"vm_id": "rpc-vm"}))["deleted"] is True
            await client.aclose()


@dataclass
class FakeDownload:
    manifest: Any
    data: Any
    complete: bool = True


@dataclass
class FakeNode:
    templates: dict[bytes, Any]
    asked: list[tuple[str, str | None]] = field(default_factory=list)

    async def fetch(self, name: str, version: str | None, notifier: Notifier) -> dict[str, Any]:
        self.asked.append((name, version))
        for tid, download in self.templates.items():
            if download.manifest.name == name:
                return {"template_id": tid.hex(), "path": str(download.data.path)}
        raise RpcError("unknown_template", f"no {name}")


async def test_node_templates_goes_through_the_nodes_fetch(tmp_path: Path) -> None:
    @dataclass
    class Manifest:
        name: str = "tinylinux"
        version: str = "2"
        format: ImageFormat = ImageFormat.QCOW2
        size: int = 4096

    @dataclass
    class Data:
        path: Path = tmp_path / "x.img"

    node = FakeNode({TEMPLATE_ID: FakeDownload(Manifest(), Data())})
    source = NodeTemplates(cast(FetchingNode, node))
    ready = await source.ready_template("tinylinux", None, None, silent())
    assert (ready.name, ready.version, ready.format) == ("tinylinux", "2", ImageFormat.QCOW2)
    assert ready.path == tmp_path / "x.img"
    by_id = await source.ready_template(None, None, TEMPLATE_ID, silent())
    assert by_id.template_id == TEMPLATE_ID
    assert node.asked == [("tinylinux", None), ("tinylinux", "2")]
    with pytest.raises(RpcError) as caught:
        await source.ready_template(None, None, b"\x01" * 32, silent())
    assert caught.value.code == "unknown_template"
    with pytest.raises(RpcError, match="not") as caught:
        await source.ready_template("tinylinux", None, b"\x01" * 32, silent())
    assert caught.value.code == "unknown_template"


def test_cpu_utilisation() -> None:
    assert cpu_utilisation(0, 500_000_000, 1.0, 1) == pytest.approx(0.5)
    assert cpu_utilisation(0, 1_000_000_000, 1.0, 2) == pytest.approx(0.5)
    assert cpu_utilisation(0, 5_000_000_000, 1.0, 1) == 1.0  # clamped
    assert cpu_utilisation(10, 5, 1.0, 1) == 0.0  # the domain restarted
    assert cpu_utilisation(0, 10, 0.0, 1) == 0.0


def test_boot_problem_and_virtual_size() -> None:
    mbr = bytes(510) + b"\x55\xaa"
    assert boot_problem(mbr, ImageFormat.RAW, 1 << 20) is None
    assert boot_problem(bytes(512), ImageFormat.RAW, 1 << 20) is not None
    assert boot_problem(b"", ImageFormat.RAW, 100) is not None
    qcow2 = b"QFI\xfb" + bytes(20) + (5 << 30).to_bytes(8, "big")
    assert boot_problem(qcow2, ImageFormat.QCOW2, 1 << 20) is None
    assert template_virtual_size(qcow2, ImageFormat.QCOW2, 1 << 20) == 5 << 30
    assert template_virtual_size(mbr, ImageFormat.RAW, 1 << 20) == 1 << 20


def test_load_flavors(tmp_path: Path) -> None:
    assert load_flavors(None) == default_flavors()
    path = tmp_path / "flavors.toml"
    path.write_text(
        '[flavors.micro]\nvcpus = 1\nmemory = "64MiB"\ndisk = "512MiB"\nmax_vcpus = 2\n'
    )
    flavors = load_flavors(path)
    assert list(flavors) == ["micro"]
    assert flavors["micro"].max_vcpus == 2 and flavors["micro"].memory == 64 * MIB
    with pytest.raises(ConfigError, match="does not exist"):
        load_flavors(tmp_path / "nope.toml")
    path.write_text("[flavors.micro\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_flavors(path)
    path.write_text("[flavors.micro]\nvcpus = 1\n")
    with pytest.raises(ConfigError, match="lacks memory, disk"):
        load_flavors(path)


def test_cli_flavors_and_refusals(tmp_path: Path) -> None:
    from typer.testing import CliRunner
    from vmswarm.cli.main import app

    runner = CliRunner()
    path = tmp_path / "flavors.toml"
    path.write_text('[flavors.micro]\nvcpus = 1\nmemory = "64MiB"\ndisk = "512MiB"\n')
    listed = runner.invoke(app, ["flavors", "--flavors", str(path), "--json"])
    assert listed.exit_code == 0, listed.output
    assert '"name": "micro"' in listed.stdout
    table = runner.invoke(app, ["flavors", "--control", str(tmp_path / "none.sock")])
    assert table.exit_code == 0
    assert table.stdout.splitlines()[1].startswith("tiny")
    no_daemon = runner.invoke(app, ["vms", "--control", str(tmp_path / "none.sock")])
    assert no_daemon.exit_code == 3  # the daemon is unreachable
    assert "no daemon control socket" in no_daemon.stderr
    nothing = runner.invoke(app, ["vm", "resize", "abc", "--control", str(tmp_path / "x")])
    assert nothing.exit_code == 2 and "--vcpus N and/or --memory SIZE" in nothing.stderr
    bad_size = runner.invoke(app, ["vm", "resize", "abc", "--memory", "lots"])
    assert bad_size.exit_code == 2 and "not a size" in bad_size.stderr


async def test_a_host_node_launches_through_its_swarm_fetch(tmp_path: Path) -> None:
    """The real path inside one trio run: publish to a center, launch on a host node."""
    from vmswarm.daemon.control import call_control
    from vmswarm.swarm.manifest import build_manifest
    from vmswarm.swarm.messages import Role

    from .test_download import CHUNK
    from .test_node import cluster, publish

    data = bytearray(b"\x5a" * (4 * CHUNK))
    data[510:512] = b"\x55\xaa"
    data[CHUNK : 2 * CHUNK] = bytes(CHUNK)  # a zero chunk, never sent
    manifest = build_manifest(bytes(data), "tmpl", "boot1", chunk_size=CHUNK)
    launcher = LibvirtLauncher("test:///default")
    async with cluster(tmp_path) as c:
        center = await c.node("center", Role.STORAGE)
        node = Node(
            NodeConfig(
                role=Role.HOST,
                data_dir=tmp_path / "host",
                tracker=c.tracker,
                control_path=tmp_path / "host.sock",
                allow_unsigned=True,
            ),
            vm_launcher=launcher,
        )
        address = await c.nursery.start(node.run)
        await publish(tmp_path, c.nursery, bytes(data), manifest, c.tracker, [center])
        sock = tmp_path / "host.sock"
        with trio.fail_after(20):
            launched = await call_control(
                sock, "launch", {"name": "tmpl", "version": "boot1", "flavor": "tiny"}
            )
        assert launched["template_id"] == manifest.template_id.hex()
        assert launched["host"] == f"{address[0]}:{address[1]}"
        status = await call_control(sock, "status", {})
        assert status["vm_service"]["capacity"]["vcpus_used"] == 1
        # The same methods answer on the TCP port, where the tracker forwards launches.
        async with RpcClient(await trio.open_tcp_stream(*address)) as rpc:
            listed = await rpc.call("vms", {})
            assert [vm["vm_id"] for vm in listed["vms"]] == [launched["vm_id"]]
            await rpc.call("vm_delete", {"vm_id": launched["vm_id"]})
        path = tmp_path / "host" / "templates" / f"{manifest.template_id.hex()}.img"
        assert await trio.Path(path).read_bytes() == bytes(data)  # the template is untouched
    launcher.close()
