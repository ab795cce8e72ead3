"""The Flower backend: each round's clients run in Flower's simulation engine (``flwr``, Ray actors).

``federation.backend = "flower"`` trains the same :func:`~cl_bench.federation.client.train_client`
as the sequential backend, but inside Flower ``ClientApp`` s executed by Ray actors, several at a
time (``client_cpus`` / ``client_gpus`` per client: ``client_gpus = 0.25`` puts four clients on
one GPU). The server side stays the federation loop of :mod:`cl_bench.federation.rounds`: it
samples the clients, aggregates their uploads with the strategy's rule and evaluates; only the
clients' local rounds move.

How it uses Flower (flwr 1.42, Ray 2.55)
----------------------------------------
- One simulation per run, started by :class:`FlowerBackend` and stopped by :meth:`~FlowerBackend.close`
  (Ray's start and stop cost ~5 s together, too much for every round; each actor's first task also
  builds its replica, below: imports and the session, ~6-10 s on a 2-core CPU; a round then adds
  ~0.05 s of messaging). ``flwr.simulation.run_simulation``
  (the engine's in-process Python entry point; deprecated in favour of the ``flwr run`` CLI, but the
  only one that runs in this process, so its deprecation notice is filtered out) blocks the thread
  that calls it, so it runs in a daemon thread of ours, while Flower runs the ``ServerApp`` 's main
  in a thread of this process as well. That main is our own loop (:class:`_Simulation`): it takes a
  round's tasks from a queue, sends one ``Message`` per task to the task's virtual node (one node
  per client), collects the replies and hands them back through a second queue to
  :meth:`FlowerBackend.run_round`, called by the federation loop in the caller's thread. No sockets
  besides Ray's own; Ray is started here in the calling thread (its signal handlers are put back
  so cl-bench's SIGTERM/SIGINT handling keeps working), and Flower's telemetry and Ray's usage
  statistics are off.
- Only the task's communicated state travels in the ``Message`` (an ``ArrayRecord``; each tensor's
  raw bytes with its torch dtype, so bf16 and every other dtype come back bit-exact: :func:`to_record`),
  with the task's fields, its sample indices and the experience's :class:`ExperienceInfo` as
  plumbing. The upload travels back the same way. Bytes are counted by the federation loop from
  the states themselves, as with the sequential backend.

Replicas
--------
Each Ray actor is a long-lived process that serves many clients. The first task it gets builds a
replica :class:`~cl_bench.loop.Session` from the run's :class:`~cl_bench.loop.Plan` (pickled to
``<run_dir>/federation/plan.pkl``; same seeds, so the same model and data as the server's), cached
for the actor's life. A replica must hold the server's model up to the communicated state, which
the task then overwrites. Before a task of experience ``i`` the replica therefore replays, for every
experience ``e < i`` it has not finished, what the server did: ``before_experience(e)``, loading the
final aggregated communicated state of ``e`` and ``after_experience(e)`` (a merge into W0, a frozen
MoRA bank...), then ``before_experience(i)`` once. The final state of each finished experience is
written by the server (:meth:`FlowerBackend.end_experience`, which must get the state the server
held *before* its ``after_experience``) to ``<run_dir>/federation/final_<e>.pt`` with the
experience's info: simulation plumbing read by the replicas, not communication. Every
client runs with ``restore=True`` (the replica is put back after the task), so the replica stays at
"after ``before_experience(i)``" whichever clients it serves, in whatever order.

Limits: one client (``clients = 1``) is the centralised run and uses the run's own generators,
which live in the server process: the Flower backend refuses it (use ``sequential``). A strategy
whose training draws from torch's global generator (dropout) is not reproduced exactly: the
sequential backend's global generator runs on through its clients in order, each actor's through
the clients it happens to serve. Each actor keeps a full replica
(model and the run's data on its device): memory grows with the number of concurrent clients.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read by flwr at import: no POST to flower.ai
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from cl_bench import errors, threads
from cl_bench.errors import ClBenchError, FederationError
from cl_bench.federation.client import ClientResult, ClientTask, train_client
from cl_bench.strategy import ExperienceInfo

if TYPE_CHECKING:
    from cl_bench.loop import Plan, Session

log = logging.getLogger("cl_bench")

RAW = "cl_bench.torch-raw"  # Array stype: the tensor's bytes in its own dtype (numpy has no bf16)
FEDERATION_DIR = "federation"
PLAN_FILE = "plan.pkl"
POLL_S = 0.02  # how often the server loop pulls replies (Flower's own send_and_receive: 0.1 s)
START_TIMEOUT_S = 600.0


def final_file(directory: Path, experience: int) -> Path:
    """Where the server leaves experience ``experience``'s final aggregated state for the replicas."""
    return directory / f"final_{experience}.pt"


# -- tensors <-> Flower records -------------------------------------------------------------------
def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """``state`` as an ArrayRecord: each tensor's raw bytes, its torch dtype and shape (exact for
    every dtype, bf16 included; the order of the keys is kept)."""
    arrays = {}
    for name, t in state.items():
        flat = t.detach().cpu().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        arrays[name] = Array(dtype=str(t.dtype), shape=tuple(t.shape), stype=RAW, data=data)
    return ArrayRecord(arrays)


def from_record(record: ArrayRecord, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of :func:`to_record`, on ``device``."""
    out = {}
    for name, a in record.items():
        if a.stype != RAW:
            raise FederationError(f"tensor {name!r} arrived as {a.stype!r}, not as {RAW!r}")
        dtype = getattr(torch, a.dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise FederationError(f"tensor {name!r} arrived with an unknown dtype {a.dtype!r}")
        if a.data:
            flat = torch.frombuffer(bytearray(a.data), dtype=torch.uint8).view(dtype)
            t = flat.reshape(a.shape)
        else:
            t = torch.empty(a.shape, dtype=dtype)
        out[name] = t.to(device)
    return out


def info_fields(info: ExperienceInfo) -> dict[str, Any]:
    """``info`` as plain values (its ``logit_classes`` a list: the server's buffer is reused)."""
    return {
        "index": int(info.index),
        "classes": [int(c) for c in info.classes],
        "seen_classes": [int(c) for c in info.seen_classes],
        "logit_classes": [int(c) for c in info.logit_classes.tolist()],
        "task_label": int(info.task_label),
        "n_samples": int(info.n_samples),
        "n_steps": int(info.n_steps),
        "training": bool(info.training),
    }


def info_from_fields(fields: dict[str, Any], session: Session) -> ExperienceInfo:
    """The :class:`ExperienceInfo` of :func:`info_fields` on ``session``, its classes written into the
    replica's own static buffer as the loop does on the server (CUDA graphs read that buffer)."""
    from cl_bench.loop import static_classes

    return ExperienceInfo(
        index=int(fields["index"]),
        classes=tuple(int(c) for c in fields["classes"]),
        seen_classes=tuple(int(c) for c in fields["seen_classes"]),
        logit_classes=static_classes(
            session.logit_buffers, [int(c) for c in fields["logit_classes"]], session.plan.device
        ),
        task_label=int(fields["task_label"]),
        n_samples=int(fields["n_samples"]),
        n_steps=int(fields["n_steps"]),
        training=bool(fields["training"]),
    )


def _config(fields: dict[str, Any]) -> ConfigRecord:
    """A ConfigRecord of ``fields`` (Flower's types: scalars, str, bytes and non-empty lists; an
    empty list is sent as the empty bytes)."""
    return ConfigRecord({k: (b"" if v == [] else v) for k, v in fields.items() if v is not None})


def _list(value: Any) -> list[Any]:
    return [] if value == b"" else list(value)


def fields_of(content: RecordDict, key: str) -> dict[str, Any]:
    """The plain values of ``content``'s ConfigRecord ``key``."""
    return dict(content.config_records[key])


def arrays_of(content: RecordDict, key: str) -> ArrayRecord:
    return content.array_records[key]


def task_message(
    task: ClientTask, info: ExperienceInfo, token: str, directory: Path, cpus: float = 1.0
) -> RecordDict:
    """The content of the Message that asks a client for ``task`` (``token``: the run, whose plan
    and final states are in ``directory``; ``cpus``: the client's torch threads)."""
    content = RecordDict(
        {
            "state": to_record(task.state),
            "task": _config(
                {
                    "token": token,
                    "directory": str(directory),
                    "cpus": float(cpus),
                    "experience": int(task.experience),
                    "round": int(task.round),
                    "client": int(task.client),
                    "seed": None if task.seed is None else int(task.seed),
                    "n_steps": int(task.n_steps),
                    "first_step": int(task.first_step),
                    "schedule_start": int(task.schedule_start),
                    "schedule_steps": int(task.schedule_steps),
                }
            ),
            "info": _config(info_fields(info)),
        }
    )
    if task.indices is not None:
        content["indices"] = ArrayRecord({"indices": Array(np.asarray(task.indices, dtype=np.int64))})
    return content


def task_from_message(content: RecordDict, device: torch.device) -> ClientTask:
    """The :class:`ClientTask` of :func:`task_message`, its state on ``device``."""
    t = fields_of(content, "task")
    indices = arrays_of(content, "indices")["indices"].numpy() if "indices" in content else None
    return ClientTask(
        experience=int(t["experience"]),
        round=int(t["round"]),
        client=int(t["client"]),
        indices=indices,
        seed=int(t["seed"]) if "seed" in t else None,
        state=from_record(arrays_of(content, "state"), device),
        n_steps=int(t["n_steps"]),
        first_step=int(t["first_step"]),
        schedule_start=int(t["schedule_start"]),
        schedule_steps=int(t["schedule_steps"]),
    )


def info_of(content: RecordDict) -> dict[str, Any]:
    """The :func:`info_fields` a task message carries."""
    fields = fields_of(content, "info")
    for key in ("classes", "seen_classes", "logit_classes"):
        fields[key] = _list(fields[key])
    return fields


# -- the client side: replicas in Ray actors -----------------------------------------------------
@dataclass
class Replica:
    """A client process's copy of the server's session, kept in step with it experience by experience
    (module docstring): ``finished`` experiences have been replayed, ``current`` has had its
    ``before_experience``."""

    token: str
    directory: Path
    session: Session
    finished: int = 0
    current: int | None = None
    graphs_ready: bool = False

    @classmethod
    def build(cls, token: str, directory: Path) -> Replica:
        """The replica of the run whose plan the server pickled into ``directory``."""
        from cl_bench.cli import load_components
        from cl_bench.loop import build_session

        load_components()
        with open(directory / PLAN_FILE, "rb") as fh:
            plan: Plan = pickle.load(fh)
        quiet = log.level
        log.setLevel(logging.ERROR)  # the server has said it all (no pretrained weights...)
        try:
            session = build_session(plan)
        finally:
            log.setLevel(quiet)
        return cls(token, directory, session)

    def final(self, experience: int) -> tuple[dict[str, torch.Tensor], ExperienceInfo]:
        path = final_file(self.directory, experience)
        try:
            saved = torch.load(path, map_location=self.session.plan.device, weights_only=True)
        except FileNotFoundError:
            raise FederationError(
                f"{path} is missing: a Flower client cannot replay experience {experience} "
                "(was it trained by another backend?)"
            ) from None
        return saved["state"], info_from_fields(saved["info"], self.session)

    def begin(self, info: ExperienceInfo) -> None:
        """What the server does before its first round of an experience."""
        s = self.session
        s.strategy.train()
        s.strategy.before_experience(info)
        s.head.invalidate()
        self.current, self.graphs_ready = info.index, False

    def finish(self, experience: int) -> None:
        """Experience ``experience`` as the server ends it: its final state loaded, then
        ``after_experience``."""
        state, info = self.final(experience)
        if self.current != experience:
            self.begin(info)
        s = self.session
        s.strategy.load_communicated_state(state)
        s.strategy.after_experience(info)
        s.head.invalidate()
        self.finished, self.current = experience + 1, None

    def replay(self, upto: int) -> None:
        """Finish every experience before ``upto`` as the server did (from their final states)."""
        if upto < self.finished:
            raise FederationError(
                f"a Flower client got a task of experience {upto} after finishing experience "
                f"{self.finished - 1}"
            )
        for e in range(self.finished, upto):
            self.finish(e)

    def sync(self, experience: int, info: ExperienceInfo) -> None:
        """Bring the replica to "``before_experience(experience)`` done, as on the server": replay
        the experiences before it, then begin it with ``info`` (the server's)."""
        if self.current == experience:
            return
        self.replay(experience)
        self.begin(info)

    def train(self, task: ClientTask, info: ExperienceInfo) -> ClientResult:
        self.sync(task.experience, info)
        result = train_client(self.session, task, info, restore=True, graphs_ready=self.graphs_ready)
        self.graphs_ready = True
        return result


_REPLICA: Replica | None = None  # this process's replica (a Ray actor serves many clients)


def replica_for(token: str, directory: Path, cpus: float) -> Replica:
    """This process's replica of run ``token``, built at its first task."""
    global _REPLICA
    if _REPLICA is None or _REPLICA.token != token:
        _REPLICA = None
        torch.set_num_threads(max(1, int(cpus)))
        _REPLICA = Replica.build(token, directory)
    return _REPLICA


def handle_train(msg: Message, context: Context) -> Message:
    """The ClientApp's train function: one client's round on this actor's replica.

    A failure is sent back as the reply's ``error`` (type, message and traceback) for the server
    to raise: a one-line :class:`ClBenchError` stays the same error there.
    """
    try:
        t = fields_of(msg.content, "task")
        replica = replica_for(str(t["token"]), Path(str(t["directory"])), float(t["cpus"]))
        device = replica.session.plan.device
        task = task_from_message(msg.content, device)
        info = info_from_fields(info_of(msg.content), replica.session)
        result = replica.train(task, info)
        reply = RecordDict(
            {
                "state": to_record(result.state),
                "result": _config(
                    {
                        "client": result.client,
                        "experience": task.experience,
                        "round": task.round,
                        "n_samples": result.n_samples,
                        "losses": [float(v) for v in result.losses],
                        "seconds": float(result.seconds),
                        "peak_bytes": int(result.peak_bytes),
                        "pid": os.getpid(),
                    }
                ),
            }
        )
    except Exception as err:
        global _REPLICA
        _REPLICA = None  # half-way through a hook or a step: a later task builds a new one
        reply = error_content(err)
    return Message(reply, reply_to=msg)


def error_content(err: BaseException) -> RecordDict:
    """A client's failure as a reply: the error's type, message, traceback and the process."""
    tb = "".join(traceback.format_exception(err))
    fields: dict[str, Any] = {
        "type": type(err).__name__,
        "message": str(err),
        "traceback": tb,
        "pid": os.getpid(),
    }
    return RecordDict({"error": ConfigRecord(fields)})


CLIENT_APP = ClientApp()
CLIENT_APP.train()(handle_train)


# -- the server side: the simulation and its loop -----------------------------------------------
class _Quiet(logging.Filter):
    """Two of Flower's warnings that say nothing here: ``run_simulation`` is deprecated for the
    ``flwr run`` CLI (we run in this process on purpose), and every actor's "Manually terminating"
    when the simulation stops."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("DEPRECATED FEATURE") and "run_simulation" in str(record.args):
            return False
        return not msg.startswith("Manually terminating")


_FLWR_LOG = logging.getLogger("flwr")
_FLWR_LOG.addFilter(_Quiet())
_FLWR_LOG.setLevel(logging.WARNING)  # flwr logs at DEBUG, which reaches any root handler


@dataclass
class Reply:
    """One client's answer: its upload and figures, or the error it raised."""

    content: RecordDict | None
    error: str | None  # Flower's own error (the ClientApp could not run)


class _Simulation:
    """Flower's simulation engine in a daemon thread, with our ServerApp main serving rounds."""

    def __init__(self, n_nodes: int, client_resources: dict[str, float]) -> None:
        self.n_nodes = n_nodes
        self.requests: queue.Queue[list[RecordDict] | None] = queue.Queue()
        self.replies: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.stop = threading.Event()  # the engine has stopped
        self.closing = threading.Event()  # close() was called
        self.failure: BaseException | None = None
        self.nodes: list[int] = []
        self.own_ray = _start_ray()
        app = ServerApp()
        app.main()(self._main)
        self.thread = threading.Thread(
            target=self._engine, args=(app, client_resources), name="flower-simulation", daemon=True
        )
        self.thread.start()
        try:
            _, value = self._next(START_TIMEOUT_S, "the simulation to start")
        except BaseException:
            self.close()
            raise
        self.nodes = list(value)

    def _engine(self, app: ServerApp, client_resources: dict[str, float]) -> None:
        from flwr.simulation import run_simulation

        try:
            run_simulation(
                app,
                CLIENT_APP,
                num_supernodes=self.n_nodes,
                backend_config={"client_resources": dict(client_resources)},
            )
        except BaseException as err:
            self.failure = err
        finally:
            self.stop.set()
            self.replies.put(("stopped", None))

    def _main(self, grid: Grid, context: Context) -> None:
        """The ServerApp's main: wait for the virtual nodes, then serve rounds until closed."""
        while len(nodes := sorted(grid.get_node_ids())) < self.n_nodes:
            if self._closing():
                return
            time.sleep(POLL_S)
        self.replies.put(("ready", nodes))
        while not self._closing():
            try:
                request = self.requests.get(timeout=0.2)
            except queue.Empty:
                continue
            if request is None:
                return
            try:
                self.replies.put(("round", self._round(grid, request)))
            except BaseException as err:
                self.replies.put(("error", err))
                return

    def _closing(self) -> bool:
        return self.stop.is_set() or self.closing.is_set() or not threading.main_thread().is_alive()

    def _round(self, grid: Grid, contents: list[RecordDict]) -> list[Reply]:
        """Send one message per content (content ``k`` to node ``k``'s client), wait for every reply."""
        messages = [
            Message(content, self.nodes[int(fields_of(content, "task")["client"])], "train")
            for content in contents
        ]
        ids = list(grid.push_messages(messages))
        if len(ids) != len(messages):
            raise FederationError(f"Flower accepted {len(ids)} of {len(messages)} client messages")
        position = {mid: k for k, mid in enumerate(ids)}
        out: list[Reply | None] = [None] * len(ids)
        waiting = set(ids)
        while waiting:
            if self._closing():
                raise FederationError("the Flower simulation was closed during a round")
            for reply in grid.pull_messages(waiting):
                mid = reply.metadata.reply_to_message_id
                waiting.discard(mid)
                if reply.has_error():
                    out[position[mid]] = Reply(None, f"{reply.error.code}: {reply.error.reason}")
                else:
                    out[position[mid]] = Reply(reply.content, None)
            if waiting:
                time.sleep(POLL_S)
        return [r for r in out if r is not None]

    def _next(self, timeout: float, what: str) -> tuple[str, Any]:
        """The next reply of the server loop; a one-line error when the engine died or timed out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                kind, value = self.replies.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise FederationError(
                        f"Flower: timed out after {timeout:.0f}s waiting for {what}"
                    ) from None
                continue
            if kind in ("error", "stopped") and self.failure is not None:  # the engine died first
                raise FederationError(
                    f"the Flower simulation stopped while waiting for {what}: {_root(self.failure)}"
                ) from self.failure
            if kind == "error":
                raise FederationError(f"Flower's server loop failed: {_root(value)}") from value
            if kind == "stopped":
                raise FederationError(f"the Flower simulation stopped while waiting for {what}")
            return kind, value

    def run(self, contents: list[RecordDict]) -> list[Reply]:
        if self.stop.is_set():
            raise FederationError("the Flower simulation is not running (closed, or it failed)")
        self.requests.put(contents)
        _, replies = self._next(float("inf"), "the clients of a round")
        return list(replies)

    def close(self, timeout: float = 60.0) -> None:
        """End the server loop (a round in flight is abandoned); the engine then stops the actors
        and Ray."""
        self.closing.set()
        self.requests.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("the Flower simulation did not stop within %.0fs", timeout)
        if self.own_ray:
            import ray

            ray.shutdown()  # already done by the engine, unless it failed before building its pool


def _root(err: BaseException) -> str:
    """The innermost cause of ``err`` in one line (Flower wraps the engine's errors twice)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


def _start_ray() -> bool:
    """Start Ray here (Flower would in its own thread) so that its workers import this process's
    modules (``PYTHONPATH``), its start-up warnings are dropped and the signal handlers it sets
    (``sys.exit`` on SIGTERM) are put back: cl-bench records a killed run as interrupted. False:
    Ray was running already (Flower's engine still shuts it down at its end)."""
    import ray

    if ray.is_initialized():
        return False
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)} if main else {}
    env = {
        "PYTHONPATH": os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])]),
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Tip: In future versions of Ray", category=FutureWarning
            )
            ray.init(
                num_cpus=threads.available_cpus(),
                include_dashboard=False,
                logging_level=logging.WARNING,
                runtime_env={"env_vars": env},
            )
        return True
    finally:
        for s, handler in saved.items():
            if handler is not None:
                signal.signal(s, handler)


# -- the backend ---------------------------------------------------------------------------------
class FlowerBackend:
    """:class:`cl_bench.federation.rounds.Backend` over Flower's simulation engine.

    Built by the federation loop at the run's first experience (it starts the simulation: Ray, one
    virtual node per client, the actor pool), used for every round, closed at the end of the run
    (also a context manager). The server's model is not touched here: :meth:`run_round` only moves
    tasks out and results back.
    """

    def __init__(self, session: Session) -> None:
        fed = session.federation
        if fed is None:
            raise FederationError("the Flower backend needs a run with a [federation] table")
        cfg, plan = fed.cfg, session.plan
        cfg.check_for(plan.device.type)
        gpus = cfg.client_gpus
        if plan.device.type != "cuda" and gpus > 0:
            log.warning("federation.client_gpus = %s ignored: the run is on the CPU", gpus)
            gpus = 0.0
        cpus, n_gpus = threads.available_cpus(), torch.cuda.device_count() if gpus > 0 else 0
        if cfg.client_cpus > cpus or gpus > n_gpus:
            have = f"{cpus} CPUs" + (f" and {n_gpus} GPUs" if gpus > 0 else "")
            raise FederationError(
                f"federation.client_cpus = {cfg.client_cpus}"
                + (f" / client_gpus = {gpus}" if gpus > 0 else "")
                + f" is more than one client can get here ({have}): not even one Flower client fits"
            )
        self.session = session
        self.cpus = cfg.client_cpus
        self.directory = plan.run_dir / FEDERATION_DIR
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / PLAN_FILE, "wb") as fh:
            pickle.dump(plan, fh)
        self.token = uuid.uuid4().hex
        self.infos: dict[int, dict[str, Any]] = {}
        self.sim: _Simulation | None = _Simulation(cfg.clients, {"num_cpus": self.cpus, "num_gpus": gpus})

    def __enter__(self) -> FlowerBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_experience(self, index: int) -> None:
        """Nothing: a replica begins an experience at its first task of it."""

    def run_round(self, tasks: list[ClientTask], info: ExperienceInfo) -> list[ClientResult]:
        """Every task's client trained by a Flower ClientApp; the results in the tasks' order."""
        if self.sim is None:
            raise FederationError("the Flower backend is closed")
        self.infos.setdefault(info.index, info_fields(info))
        contents = [task_message(task, info, self.token, self.directory, self.cpus) for task in tasks]
        replies = self.sim.run(contents)
        device = self.session.plan.device
        return [self._result(task, reply, device) for task, reply in zip(tasks, replies, strict=True)]

    @staticmethod
    def _result(task: ClientTask, reply: Reply, device: torch.device) -> ClientResult:
        where = f"client {task.client} (experience {task.experience}, round {task.round})"
        if reply.content is None:
            raise FederationError(f"Flower could not run {where}: {reply.error}")
        if "error" in reply.content:
            e = fields_of(reply.content, "error")
            kind, message = str(e["type"]), str(e["message"])
            log.error("%s failed in its Flower client (pid %s):\n%s", where, e["pid"], e["traceback"])
            cls = getattr(errors, kind, None)
            if isinstance(cls, type) and issubclass(cls, ClBenchError):
                try:
                    same = cls(message)
                except TypeError:  # an error class built from other arguments
                    same = None
                if same is not None:
                    raise same
            raise FederationError(f"{where} failed: {kind}: {message}")
        r = fields_of(reply.content, "result")
        if (int(r["client"]), int(r["experience"]), int(r["round"])) != (
            task.client,
            task.experience,
            task.round,
        ):
            raise FederationError(f"{where} got the reply of client {r['client']}")
        return ClientResult(
            client=task.client,
            state=from_record(arrays_of(reply.content, "state"), device),
            n_samples=int(r["n_samples"]),
            losses=[float(v) for v in _list(r["losses"])],
            seconds=float(r["seconds"]),
            peak_bytes=int(r["peak_bytes"]),
        )

    def end_experience(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """Leave experience ``index``'s final aggregated communicated state (the one loaded before
        ``after_experience``) for the replicas, written atomically."""
        info = self.infos.get(index)
        if info is None:
            raise FederationError(f"experience {index} ended without a round through the Flower backend")
        path = final_file(self.directory, index)
        tmp = path.with_suffix(".tmp")
        torch.save({"state": {k: v.detach().cpu() for k, v in state.items()}, "info": info}, tmp)
        tmp.replace(path)

    def close(self) -> None:
        """Stop the simulation (actors, Ray); idempotent."""
        sim, self.sim = self.sim, None
        if sim is not None:
            sim.close()
