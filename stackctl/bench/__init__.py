"""The benchmark behind ``stackctl bench``: multi-round QA workload, load client, report.

The CLI deploys a profile, then calls :func:`run_sweep` (and optionally
:func:`run_availability`) and finally :func:`write_report` over every profile's results.
"""

from stackctl.bench.client import Record
from stackctl.bench.report import rebuild_report, write_report
from stackctl.bench.runner import (
    AvailabilityResult,
    PointResult,
    SweepResult,
    Warmup,
    load_results,
    load_warmups,
    run_availability,
    run_availability_async,
    run_sweep,
    run_sweep_async,
)
from stackctl.bench.scenario import Scenario, ScenarioError, load_scenario
from stackctl.bench.workload import Workload

__all__ = [
    "AvailabilityResult",
    "PointResult",
    "Record",
    "Scenario",
    "ScenarioError",
    "SweepResult",
    "Warmup",
    "Workload",
    "load_results",
    "load_warmups",
    "load_scenario",
    "rebuild_report",
    "run_availability",
    "run_availability_async",
    "run_sweep",
    "run_sweep_async",
    "write_report",
]
