"""The fleet's control plane: one small Ray actor beside the Serve application.

Ray Serve's handles route a call to *some* replica; fleet-wide operations need to
reach *each* one: a rolling swap (one replica at a time), the models and metrics of
every replica. So every replica, once ready, long-polls the fleet for commands (``poll``; its
first poll makes it a member), runs them as they come and answers (``reply``); the ingress sends a
command to one member with ``call`` and awaits its answer. A member that stopped
polling for ``STALE_AFTER`` seconds (killed, or its node lost) is dropped, and
commands waiting on it fail at once.

The fleet also holds the configuration as the last admin change or reload left it,
so that a replica started later (autoscaling, a restart after a crash) serves the
fleet's current models, not those of the application's first deployment; and the
Responses API's stored responses, so that ``previous_response_id`` and
``GET /v1/responses/{id}`` find a response whichever replica created it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

#: Seconds a member waits in one ``poll`` before polling again.
POLL_WAIT = 1.0
#: A member silent for this long is gone (it polls every ``POLL_WAIT``).
STALE_AFTER = 5.0
NAMESPACE = "llmk"


class MemberGone(RuntimeError):
    """The replica a command was sent to left the fleet before answering."""


@dataclass
class _Member:
    seen: float
    inbox: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    waiting: dict[int, asyncio.Future[Any]] = field(default_factory=dict)


class Fleet:
    """The actor (``ray.remote`` is applied by ``fleet_actor``). ``config`` is the
    configuration as a dict (``Config.model_dump``), ``build`` when it was built:
    a replica of a newer build replaces the configuration (``adopt``)."""

    def __init__(self, config: dict[str, Any], build: float):
        self.config, self.build, self.version = config, build, 0
        self.members: dict[str, _Member] = {}
        self._ids = itertools.count()
        from llmk.server.responses import ResponseStore

        self.responses = ResponseStore()

    # -- members --------------------------------------------------------------------------
    async def adopt(self, config: dict[str, Any], build: float) -> tuple[int, dict[str, Any]]:
        """The configuration a starting replica serves: the fleet's, or ``config`` when
        it comes from a newer build (the application was deployed again). A replica is
        a member from its first ``poll`` on, once it is ready to serve."""
        if build > self.build:
            self.config, self.build, self.version = config, build, self.version + 1
        return self.version, self.config

    async def leave(self, member: str) -> None:
        self._drop(member, "it left the fleet")

    async def poll(self, member: str) -> list[dict[str, Any]]:
        """The commands for ``member``, waiting up to ``POLL_WAIT`` seconds for one."""
        state = self.members.get(member)
        if state is None:  # dropped while it was slow: it is back
            state = self.members[member] = _Member(time.monotonic())
        state.seen = time.monotonic()
        self._expire()
        try:
            first = await asyncio.wait_for(state.inbox.get(), POLL_WAIT)
        except TimeoutError:
            return []
        commands = [first]
        while not state.inbox.empty():
            commands.append(state.inbox.get_nowait())
        state.seen = time.monotonic()
        return commands

    async def reply(self, member: str, command: int, answer: dict[str, Any]) -> None:
        state = self.members.get(member)
        future = state.waiting.pop(command, None) if state is not None else None
        if future is not None and not future.done():
            future.set_result(answer)

    async def alive(self) -> list[str]:
        """The members that polled lately, in the order they joined."""
        self._expire()
        return list(self.members)

    # -- commands ---------------------------------------------------------------------------
    async def call(self, member: str, op: str, args: dict[str, Any] | None = None,
                   timeout: float = 600.0) -> Any:
        """Run ``op`` on ``member``: its answer, ``{"ok": true, "result": ...}`` or
        ``{"ok": false, "error": {"status", "message", "type", "code", "param"}}``;
        ``MemberGone`` if it leaves first, ``TimeoutError`` past ``timeout``."""
        state = self.members.get(member)
        if state is None:
            raise MemberGone(f"replica {member} is not in the fleet")
        ident = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        state.waiting[ident] = future
        state.inbox.put_nowait({"id": ident, "op": op, "args": args or {}})
        return await asyncio.wait_for(future, timeout)

    # -- configuration ----------------------------------------------------------------------------
    async def get_config(self) -> tuple[int, dict[str, Any]]:
        return self.version, self.config

    async def set_config(self, config: dict[str, Any]) -> int:
        """The fleet's configuration from now on (members are told by ``call``)."""
        self.config, self.version = config, self.version + 1
        return self.version

    # -- the Responses API's store (``ResponseStore``'s methods, for ``FleetResponses``) ----------------
    async def response_put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        await self.responses.put(response, conversation)

    async def response_get(self, ident: str) -> Any:
        return await self.responses.get(ident)

    async def response_delete(self, ident: str) -> bool:
        return await self.responses.delete(ident)

    # -- internals -----------------------------------------------------------------------------
    def _expire(self) -> None:
        now = time.monotonic()
        for member, state in list(self.members.items()):
            if now - state.seen > STALE_AFTER:
                self._drop(member, f"it did not poll for {now - state.seen:.0f}s")

    def _drop(self, member: str, why: str) -> None:
        state = self.members.pop(member, None)
        if state is None:
            return
        for future in state.waiting.values():
            if not future.done():
                future.set_exception(MemberGone(f"replica {member} left the fleet: {why}"))


def fleet_name(app_name: str) -> str:
    return f"llmk-fleet-{app_name}"


def fleet_actor(app_name: str, config: dict[str, Any], build: float) -> Any:
    """The fleet of application ``app_name``: created by whichever of the ingress and
    the replicas starts first, found by the others. Detached, so that it outlives the
    replica that created it; ``llmk.ray.shutdown`` removes it. Ray restarts it if its
    process dies: the members join again at their next poll, and it serves the
    configuration it was created with (an admin change since is lost: reload again)."""
    import ray

    remote = ray.remote(num_cpus=0, max_concurrency=1000, max_restarts=-1)(Fleet)
    return remote.options(name=fleet_name(app_name), namespace=NAMESPACE, get_if_exists=True,
                          lifetime="detached").remote(config, build)
