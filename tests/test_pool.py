"""Warm pools on the fake VMM (fast tier): each member a real sandbox whose guest agent
runs on the host (tests/fake_vmm.py).

A pool keeps its members ready in the background, hands each out once even under 20
concurrent claims from threads, makes one on demand when none is ready, skips a
member that died while it waited, survives a failing maker, ends its members when it
closes and is listed by ``vmr pool ls`` while it lives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from pathlib import Path

import pytest
from fake_world import IMAGE, fake, left_behind

from vmruntime.cli import main
from vmruntime.errors import VmruntimeError
from vmruntime.pools import PoolKey, PoolMember, WarmPool
from vmruntime.pools.registry import live_pools, pools_dir
from vmruntime.vm import AsyncSandbox, CreationPlan, SandboxConfig
from vmruntime.vm.sync import run, submit

KEY = PoolKey(IMAGE, cpus=1, memory_mib=256, purpose="test")


def nothing_left(driver: object) -> bool:
    """No sandbox, VM or pool listing is left (the listings' directory may stay)."""
    left = [p for p in left_behind(driver) if not p.endswith("/pools")]  # type: ignore[arg-type]
    assert left == [] and list(pools_dir().iterdir()) == [], left
    return True


def maker(driver: object, made: list[str]):  # type: ignore[no-untyped-def]
    async def make() -> PoolMember:
        sandbox = await AsyncSandbox.from_config(SandboxConfig(IMAGE),
                                                 CreationPlan(driver))  # type: ignore[arg-type]
        made.append(sandbox.id)
        return PoolMember(sandbox, payload=len(made))
    return make


async def until_ready(pool: WarmPool, count: int, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while pool.ready < count:
        assert asyncio.get_running_loop().time() < deadline, f"only {pool.ready} ready"
        await asyncio.sleep(0.02)


def test_twenty_concurrent_claims_get_twenty_distinct_members(world: Path) -> None:
    driver, made = fake(), []
    pool = WarmPool(KEY, 3, maker(driver, made), name="twenty")

    async def fill() -> None:
        pool.start()
        await until_ready(pool, 3)

    run(fill())
    # 20 threads claim at once, as 20 kernels started together would.
    with concurrent.futures.ThreadPoolExecutor(20) as threads:
        members = list(threads.map(lambda _: submit(pool.claim()).result(120), range(20)))
    ids = [member.sandbox.id for member in members]
    assert len(set(ids)) == 20, ids
    assert set(ids) <= set(made)
    assert pool.claims == 20 and pool.misses >= 17  # only 3 (plus refills) were ready
    for member in members:
        run(member.sandbox.exec(["true"], check=True))  # each one works
    for member in members:
        run(member.sandbox.stop())
    run(pool.close())
    assert nothing_left(driver)


def test_a_claim_takes_a_ready_member_and_the_pool_refills(world: Path) -> None:
    driver, made = fake(), []
    pool = WarmPool(KEY, 2, maker(driver, made), name="refill")

    async def scenario() -> None:
        pool.start()
        await until_ready(pool, 2)
        first = await pool.claim()
        assert pool.misses == 0 and first.sandbox.id == made[0]
        await until_ready(pool, 2)  # refilled in the background
        assert len(made) == 3
        await first.sandbox.stop()

    run(scenario())
    listed = {pool["name"]: pool for pool in live_pools()}
    assert [m["state"] for m in listed["refill"]["members"]] == ["ready", "ready"]
    assert listed["refill"]["key"]["source"] == IMAGE
    run(pool.close())
    assert "refill" not in {pool["name"] for pool in live_pools()}
    assert nothing_left(driver)


def test_a_member_that_died_while_waiting_is_never_handed_out(world: Path) -> None:
    driver, made = fake(), []
    pool = WarmPool(KEY, 1, maker(driver, made), name="died")

    async def scenario() -> str:
        pool.start()
        await until_ready(pool, 1)
        pool._ready[0].sandbox._vm.kill()  # its VM dies while it waits
        member = await pool.claim()
        assert member.sandbox.id != made[0] and member.sandbox.running
        await member.sandbox.stop()
        return member.sandbox.id

    run(scenario())
    run(pool.close())
    assert nothing_left(driver)


def test_a_failing_maker_does_not_end_the_pool(world: Path) -> None:
    driver, made = fake(), []
    good = maker(driver, made)
    calls = []

    async def flaky() -> PoolMember:
        calls.append(1)
        if len(calls) == 1:
            raise VmruntimeError("the first one fails")
        return await good()

    pool = WarmPool(KEY, 1, flaky, name="flaky")

    async def scenario() -> None:
        pool.start()
        await until_ready(pool, 1, timeout=30)

    run(scenario())
    assert pool.failures == ["VmruntimeError: the first one fails"]
    run(pool.close())
    assert nothing_left(driver)


def test_vmr_pool_ls_shows_a_live_pool(world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    driver, made = fake(), []
    pool = WarmPool(KEY, 1, maker(driver, made), name="listed")

    async def fill() -> None:
        pool.start()
        await until_ready(pool, 1)

    run(fill())
    assert main(["pool", "ls"]) == 0
    out = capsys.readouterr().out
    assert "listed" in out and made[0] in out and "ready 1/1" in out
    assert main(["pool", "ls", "--json"]) == 0
    (listed,) = [p for p in json.loads(capsys.readouterr().out) if p["name"] == "listed"]
    assert listed["members"][0]["id"] == made[0]
    run(pool.close())
    assert main(["pool", "ls"]) == 0
    assert "listed" not in capsys.readouterr().out
    with pytest.raises(VmruntimeError, match="closed"):
        run(pool.claim())
    assert nothing_left(driver)
