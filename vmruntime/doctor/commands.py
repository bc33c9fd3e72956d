"""``vmr doctor``: registered by :mod:`vmruntime.cli`."""

from __future__ import annotations

import argparse

from vmruntime.doctor.checks import format_report, run_checks


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    doctor = commands.add_parser("doctor", help="check what sandboxes need on this machine")
    doctor.set_defaults(handler=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    checks = run_checks()
    print(format_report(checks), end="")
    # A warning (say, no KVM: VMs then run under TCG) is no reason to fail.
    return 0 if all(check.ok or not check.required for check in checks) else 1
