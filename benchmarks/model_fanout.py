"""Model fan-out on the SSH testbed: peer (the default) against direct per-host upload.

One run builds a testbed of N engine hosts (default 8), generates a model of real random bytes
(default 2 GiB: safetensors-named shards, config.json, tokenizer.json, plus a small original/
checkpoint that must not travel) under /tmp, and copies it onto every host twice, through `up`'s
own apply phase (tests/helpers/model_fanout.py: each host's Applier.prepare with one shared
ModelDistributor, as `up` runs them): once with model.distribute: direct (the operator uploads
to every host, which is what `up` did before, one host at a time in parallel) and once with
peer, wiping the hosts' copies in between. It measures the bytes the operator's machine sent
(the testbed bridge's tx counter: the root namespace's own traffic to the hosts; host-to-host
traffic does not cross it) and the wall time, checks every copy against the source, writes a
markdown table, and removes the testbed and the model.

    python -m benchmarks.model_fanout [--hosts 8] [--gib 2] [--out benchmarks/results/model_fanout.md]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

from stackctl.models import local_model_files
from stackctl.probe import MODEL_MANIFEST
from tests.helpers import model_fanout as mf
from tests.testbed.netns import Testbed, environment_problem


def run_mode(bed, inventory: Path, expected: dict) -> dict:
    mf.wipe_models(bed)
    result = mf.apply_models(inventory, bed, timeout=1800)
    if result["problems"] or result["errors"] or result["stuck"]:
        raise SystemExit(
            f"distribution failed: {result['problems'] or result['errors'] or result['stuck']}"
        )
    for host in bed.hosts:
        digests = mf.digest(mf.model_dir(bed, host))
        digests.pop(MODEL_MANIFEST, None)
        if digests != expected:
            raise SystemExit(f"{host.name}: its copy differs from the source")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "model_fanout.md"
    )
    args = parser.parse_args()
    problem = environment_problem()
    if problem:
        raise SystemExit(f"the testbed cannot run here: {problem}")
    work = Path(tempfile.mkdtemp(prefix="stackctl-fanout-", dir="/tmp"))
    try:
        started = time.monotonic()
        source = mf.make_model(work / mf.MODEL_NAME_DIR, int(args.gib * 1024**3))
        print(f"generated {args.gib} GiB in {time.monotonic() - started:.1f} s", flush=True)
        total = sum(local_model_files(source).values())
        expected = {
            rel: d for rel, d in mf.digest(source).items() if not rel.startswith("original/")
        }
        rows = {}
        with Testbed(args.hosts) as bed:
            for mode in ("direct", "peer"):
                inventory = mf.write_inventory(bed, work / f"{mode}.yaml", source, mode)
                rows[mode] = run_mode(bed, inventory, expected)
                r = rows[mode]
                print(
                    f"{mode}: {r['seconds']:.1f} s, operator sent {r['operator_tx_bytes'] / 1024**3:.2f} GiB",
                    flush=True,
                )
            mf.wipe_models(bed)
        write_report(args, total, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_report(args, total: int, rows: dict) -> None:
    gib = 1024**3
    lines = [
        "# Model fan-out: peer against direct upload",
        "",
        f"`python -m benchmarks.model_fanout --hosts {args.hosts} --gib {args.gib}` on the SSH testbed "
        f"({args.hosts} engine hosts in network namespaces behind one bridge, one machine: "
        f"{platform.machine()}, {_cpus()} CPUs). The model: {total / gib:.2f} GiB of random bytes in 4 "
        "safetensors shards plus config.json and tokenizer.json (a 1 MiB original/ checkpoint is left "
        "out, as vLLM does). Each mode copies it onto every host through `up`'s apply phase; every copy "
        "is checked (sha256) against the source afterwards.",
        "",
        "| mode | wall time | sent by the operator | x model size | transfers |",
        "|---|---:|---:|---:|---|",
    ]
    for mode, r in rows.items():
        kinds = {}
        for t in r["transfers"]:
            kinds[t["kind"]] = kinds.get(t["kind"], 0) + 1
        lines.append(
            f"| {mode} | {r['seconds']:.1f} s | {r['operator_tx_bytes'] / gib:.2f} GiB | "
            f"{r['operator_tx_bytes'] / total:.2f} | {', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))} |"
        )
    peer = rows.get("peer")
    if peer:
        order = sorted(peer["transfers"], key=lambda t: t["started"])
        lines += [
            "",
            "Peer mode's transfers in the order they started (source -> host: start, duration; the "
            "operator seeds one host, then every host holding a copy serves one peer at a time): "
            + ", ".join(
                f"{t['from']} -> {t['to']}: {t['started']:.1f} s, {t['seconds']:.1f} s"
                for t in order
            )
            + ".",
        ]
    lines += [
        "",
        "Bytes sent by the operator: the testbed bridge's tx counter during the apply phase (all of the "
        "operator's traffic to the hosts: rsync, SSH, the probes and config files); host-to-host copies "
        "are switched between the hosts' ports and do not cross it. Wall times: on one machine every host "
        "and the operator share the same CPUs and the links are memory copies, so both modes cost about "
        "the same CPU (SSH encryption, rsync) and the times mostly show that; peer's copies also run in "
        "rounds (1 + log2 of the hosts). On a real cluster, direct costs N copies over the operator's "
        "uplink (or N downloads over the WAN) and peer one, with the rest at cluster-network speed.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
