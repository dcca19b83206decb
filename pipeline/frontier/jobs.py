"""Running a frontier's jobs: in this process one after another, or as Ray tasks (an existing
cluster by address, or a local one)."""

from __future__ import annotations

from collections.abc import Callable

from compressor.errors import UserError


def run_jobs(fn: Callable, jobs: list[tuple], ray: str | None = None, cpus: int | None = None) -> list:
    """``fn(*job)`` for every job: in this process in turn, or as Ray tasks (``ray``: an address,
    or ``local`` for a Ray started here with ``cpus`` CPUs); results in job order."""
    if not ray:
        return [fn(*job) for job in jobs]
    remote = _ray_remote(fn, ray, cpus)
    import ray as ray_module

    return ray_module.get([remote.remote(*job) for job in jobs])


def _ray_remote(fn: Callable, address: str, cpus: int | None):
    try:
        import ray
    except ImportError:
        raise UserError(
            "--ray: Ray is not installed; `pip install 'compress-deploy[ray]'` or run without --ray"
        ) from None
    if not ray.is_initialized():
        kwargs = {"num_cpus": cpus} if address == "local" else {"address": address}
        try:
            ray.init(include_dashboard=False, log_to_driver=True, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"--ray {address}: cannot connect ({str(exc).splitlines()[0][:160]})") from None
    return ray.remote(num_cpus=1)(fn)
