"""doctor: is this host ready to run sandboxes, and if not, what to do (``vmr doctor``).

Who uses it: the CLI and people debugging a host. It only reads: see
:mod:`vmruntime.doctor.checks`.
"""

from vmruntime.doctor.checks import Check, format_report, run_checks

__all__ = ["Check", "format_report", "run_checks"]
