"""``vmr pool ls``: the warm pools of this user's processes and their members."""

from __future__ import annotations

import argparse
import json

from vmruntime.pools.registry import live_pools


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pool = commands.add_parser("pool", help="warm pools of ready sandboxes")
    sub = pool.add_subparsers(title="pool commands")
    ls = sub.add_parser("ls", help="list live pools and their members")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(handler=_ls)


def _ls(args: argparse.Namespace) -> int:
    pools = live_pools()
    if args.json:
        print(json.dumps(pools, indent=1))
        return 0
    if not pools:
        print("no live pools")
        return 0
    for pool in pools:
        key = pool["key"]
        ready = sum(1 for m in pool["members"] if m["state"] == "ready")
        print(f"{pool['name']}  owner {pool['owner_pid']}  {key['source']}  {key['cpus']} cpu "
              f"{key['memory_mib']} MiB  {key['purpose'] or '-'}  ready {ready}/{pool['size']}  "
              f"claims {pool.get('claims', 0)} (misses {pool.get('misses', 0)})")  # fmt: skip
        for member in pool["members"]:
            print(f"  {member['id']}  {member['state']}")
        for failure in pool.get("failures", []):
            print(f"  last failure: {failure}")
    return 0
