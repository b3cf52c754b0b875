"""serve's supervisor in the model: a killed process comes back when serve would bring it back.

``workbench serve`` restarts every child that dies (:mod:`workbench.ops.supervision`): after
``initial_backoff_s``, doubling with each crash in a row up to ``max_backoff_s``, and it
gives up on a child that needs more than ``max_restarts`` restarts within ``window_s``.
The simulations do not invent their own repair times for what serve supervises (consumer
processes, API/SSE servers, redis-server): they ask the same :class:`Supervisor`, fed with
the model's clock, how long the process stays down. The scenario's ``supervisor`` section
is serve's :class:`~workbench.ops.supervision.RestartPolicy` (defaults equal), so a run shows
the recovery that the shipped configuration gives.
"""

from __future__ import annotations

from simulations.scenario import SupervisorParams
from workbench.ops.supervision import GiveUp, RestartPolicy, Supervisor


def policy_of(params: SupervisorParams) -> RestartPolicy:
    """The scenario's ``supervisor`` section as serve's restart policy."""
    return RestartPolicy(
        initial_backoff_s=float(params.initial_backoff_s),
        max_backoff_s=float(params.max_backoff_s),
        stable_after_s=float(params.stable_after_s),
        max_restarts=int(params.max_restarts),
        window_s=float(params.window_s),
    )


class SupervisedRestarts:
    """When each supervised process of a run comes back after a crash.

    One :class:`Supervisor` per process name, created on first use (the model's
    processes are not known up front). :meth:`down_for` is called at the crash and
    answers how long the process stays down, or ``None`` when serve would give up
    on it (it then stays down, and :attr:`given_up` says why).
    """

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._supervisors: dict[str, Supervisor] = {}
        self.given_up: dict[str, str] = {}

    def started(self, name: str, now: float) -> None:
        """``name`` is running from ``now`` (its first start, or a restart)."""
        self._of(name).started(name, now)

    def down_for(self, name: str, now: float) -> float | None:
        """``name`` was killed at ``now``: seconds until serve restarts it, or None."""
        decision = self._of(name).exited(name, now, -9)
        if isinstance(decision, GiveUp):
            self.given_up[name] = decision.reason
            return None
        return decision.delay_s

    def restarts(self, name: str) -> int:
        return self._of(name).children[name].restarts

    def _of(self, name: str) -> Supervisor:
        supervisor = self._supervisors.get(name)
        if supervisor is None:
            supervisor = self._supervisors[name] = Supervisor([name], self.policy)
            supervisor.started(name, 0.0)
        return supervisor
