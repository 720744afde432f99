"""A sweep's runs as Ray tasks (``aqn sweep --ray [ADDRESS]``): across the machines of a
cluster, with the rules of a local sweep.

Each run is one task reserving its config's ``trainer.resources`` (cores: it trains with that
many torch threads; GPUs: by default one when it trains on cuda), and calls the same
``run_one`` as ``--jobs``: the skip / resume / start-afresh decision and every write to
``run.json`` under the run's lock, so the results do not depend on where a run ran. The sweep
directory must be one path every node sees (a shared file system): the sweep checks it on
every node before the first run. A task whose worker or node dies has its run recorded as
failed, resumable from its last checkpoint by running the sweep again; ``retries`` lets Ray
run it again at once instead (Ray's own task retry: the retry resumes from the checkpoint).
How to start a cluster, under Slurm too: docs/integrations.md, "Sweeps on a Ray cluster".
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aqn.errors import ConfigError
from aqn.experiments.sweep import (
    RunKey,
    SweepSpec,
    mark_worker_died,
    out_dir_of,
    run_config,
    run_one,
)
from aqn.files import write_atomic

INSTALL = "pip install 'aqn[peers]' (ray==2.60.0) on every node"
PROBE_TIMEOUT_S = 120.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray: {INSTALL}", "--ray") from None
    return ray


def run_on_ray(spec: SweepSpec, runs: list[RunKey], address: str | None, retries: int,
               done: Callable[[RunKey, str], None]) -> None:
    """Every run of ``runs`` as a Ray task on the cluster at ``address`` ("auto": the one
    this machine belongs to; None: a local Ray instance with this machine's cores, or the
    instance this process is already connected to), ``done(run, status)`` as each ends."""
    ray = import_ray()
    # workers elsewhere resolve a relative path against their own directory
    spec = dataclasses.replace(spec, out_dir=str(out_dir_of(spec).resolve()))
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 **({} if address else {"num_cpus": os.cpu_count()}))
    try:
        check_shared_storage(ray, out_dir_of(spec))
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        task = ray.remote(run_one)
        pending = {}
        for run in runs:
            options = task_options(run_config(spec, run, resume=False), has_gpus)
            ref = task.options(**options, max_retries=retries, retry_exceptions=False,
                               name=run.name).remote(spec, run, options["num_cpus"])
            pending[ref] = run
        try:
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                run = pending.pop(ref)
                done(run, _outcome(ray, ref, spec, run))
        except BaseException:
            for ref in pending:  # nothing goes on running once the sweep stops
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


def task_options(cfg: Any, cluster_has_gpus: bool) -> dict[str, float]:
    """The Ray resources a run's task reserves, from its ``trainer.resources``."""
    res = cfg.trainer.resources
    gpus = res.num_gpus
    if gpus is None:
        on_cuda = cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto"
                                                   and cluster_has_gpus)
        gpus = 1 if on_cuda else 0
    return {"num_cpus": res.num_cpus, "num_gpus": gpus}


def _outcome(ray: Any, ref: Any, spec: SweepSpec, run: RunKey) -> str:
    """The run's status; a task lost with its worker or node (killed, out of memory, node
    gone) has its run recorded as failed, resumable."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError:
        raise  # run_one records a run's own errors: this is a fault of the sweep itself
    except ray.exceptions.RayError as e:
        run_dir = out_dir_of(spec) / run.name
        mark_worker_died(run_dir, run, f"its Ray worker died ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no message'})")
        return "failed"


def check_shared_storage(ray: Any, out_dir: Path) -> None:
    """Every alive node reads a file this process just wrote in ``out_dir``, or the sweep
    stops before its first run, naming the nodes that cannot see it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = out_dir / f".ray-probe-{token}"
    write_atomic(probe, token)
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        sees = ray.remote(_sees)
        refs = [sees.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(probe), token) for n in nodes]
        results = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    finally:
        probe.unlink(missing_ok=True)
    blind = [f"{host} ({n['NodeManagerAddress']})"
             for n, (ok, host) in zip(nodes, results, strict=True) if not ok]
    if blind:
        raise ConfigError(
            f"the sweep directory {out_dir} is not visible from Ray node(s) "
            f"{', '.join(blind)}: put out_dir on storage every node mounts at the same path "
            "(NFS, Lustre, ...)", "out_dir")


def _sees(path: str, token: str) -> tuple[bool, str]:
    probe = Path(path)
    try:
        return probe.read_text() == token, socket.gethostname()
    except OSError:
        return False, socket.gethostname()
