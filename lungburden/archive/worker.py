"""What an engine runs for one archive task: the series' priors when the task asks for them, then
:func:`~lungburden.archive.tasks.analyse_series`; and the Celery application of archive mode.

:func:`run_series` is the function of the local pool, :func:`run_task` (the JSON form of a
:class:`~lungburden.archive.tasks.SeriesTask`) the Celery task. A task with ``priors_url`` gets
the prior finder the node builds (:func:`lungburden.followup.priors.task_priors`); the priors it
analyses are analysed without priors of their own, each at most once per task.

Celery settings for at-least-once execution: late acknowledgement (``task_acks_late``), a task
whose worker process dies is rejected back to the queue (``task_reject_on_worker_lost``), one
message reserved per worker process (``worker_prefetch_multiplier=1``), and the broker's
visibility timeout after which the unacknowledged message of a lost worker machine is delivered
again (Redis transport).
"""

from __future__ import annotations

from lungburden.archive.tasks import DEFAULT_QUEUE, TASK_NAME, SeriesOutcome, SeriesTask, analyse_series, credentials
from lungburden.followup.priors import task_priors


def run_series(task: SeriesTask, username: str | None = None, password: str | None = None) -> SeriesOutcome:
    """:func:`analyse_series` of ``task`` with the priors it asks for (credentials: the arguments,
    else this process's environment)."""
    if username is None and password is None:
        username, password = credentials()
    return analyse_series(task, username, password, priors=task_priors(task, username, password))


def run_task(data: dict) -> dict:
    """:func:`run_series` on the JSON form of a :class:`SeriesTask` (the Celery task)."""
    return run_series(SeriesTask.from_json(data)).to_json()


def make_app(broker: str, backend: str | None = None, visibility_timeout_s: float = 3600.0,
             restore_interval_s: float = 10.0, rate_limit: str | None = None):
    """The Celery application of archive mode, with its one task registered as
    :data:`~lungburden.archive.tasks.TASK_NAME`.

    ``visibility_timeout_s`` must exceed the longest series analysis (else a running task is
    delivered a second time, harmlessly but wastefully); ``rate_limit`` (e.g. ``"60/m"``) caps
    the tasks each worker starts."""
    from celery import Celery

    app = Celery("lungburden.archive", broker=broker, backend=backend or broker)
    transport = {"visibility_timeout": visibility_timeout_s, "unacked_restore_interval": restore_interval_s,
                 "unacked_restore_throttle": 1}
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_default_queue=DEFAULT_QUEUE, task_track_started=True, result_expires=7 * 24 * 3600,
        broker_transport_options=transport, result_backend_transport_options={"retry_policy": {"timeout": 30.0}},
        broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    app.task(name=TASK_NAME, rate_limit=rate_limit)(run_task)
    return app


__all__ = ["make_app", "run_series", "run_task"]
