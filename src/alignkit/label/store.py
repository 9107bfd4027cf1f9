"""The label store: one schema, one data layer, for a SQLite file or a PostgreSQL server.

SQLAlchemy Core (not the ORM, not plain DB-API): the dialect layer gives the same tables, types and
queries on both back ends (placeholders, JSON, auto-increment keys and DDL differ between sqlite3
and psycopg), plus a thread-safe connection pool for the server's worker threads. The ORM would add
a session/identity map we do not need: every operation here is one short transaction.

Durability: every submission is ONE transaction (label row + assignment status) and is committed
before the browser is answered. SQLite runs in WAL mode with ``synchronous=FULL`` (a killed server,
or even a power cut, loses no committed label) and every write transaction starts with
``BEGIN IMMEDIATE``, so two labelers writing at once queue on the busy timeout instead of failing
with "database is locked" when a read lock cannot be upgraded.

Labels are append-only: a labeler who goes back and resubmits adds a row; the newest row of a
(task, labeler) is the current label, older ones stay as history.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError

from ..errors import InputError

SCHEMA_VERSION = "1"
PENDING, DONE, SKIPPED = "pending", "done", "skipped"

metadata = sa.MetaData()

tasks = sa.Table(
    "tasks", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(64), nullable=False, unique=True),   # sha256 of (prompt, responses)
    sa.Column("prompt", sa.JSON, nullable=False),                    # str or list of messages
    sa.Column("responses", sa.JSON, nullable=False),                 # K items, the input file's order
    sa.Column("source", sa.String(1024)),                            # "file:line" it came from
    sa.Column("created_at", sa.String(32), nullable=False),
)

labelers = sa.Table(
    "labelers", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.String(32), nullable=False),
)

assignments = sa.Table(
    "assignments", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.Integer, sa.ForeignKey("tasks.id"), nullable=False),
    sa.Column("labeler", sa.String(64), sa.ForeignKey("labelers.name"), nullable=False),
    sa.Column("shown_order", sa.JSON, nullable=False),   # shown_order[pos] = original index at display pos
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("assigned_at", sa.String(32), nullable=False),
    sa.Column("updated_at", sa.String(32), nullable=False),
    sa.UniqueConstraint("task_id", "labeler", name="one_assignment_per_labeler"),
)

labels = sa.Table(
    "labels", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.Integer, sa.ForeignKey("tasks.id"), nullable=False),
    sa.Column("labeler", sa.String(64), sa.ForeignKey("labelers.name"), nullable=False),
    sa.Column("ranks", sa.JSON),     # K places (1 = best, equal = tie), original order; null = not ranked
    sa.Column("rubric", sa.JSON),    # K rubric objects, original order; null = not scored
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("shown_order", sa.JSON, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Index("labels_by_task_labeler", "task_id", "labeler"),
)

meta = sa.Table(
    "meta", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


def now() -> str:
    """UTC time as ISO 8601 with milliseconds (sorts as text on every back end)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def task_key(prompt: Any, responses: list) -> str:
    """Content key: serving the same file twice (or a file with rows appended) adds no duplicates."""
    blob = json.dumps([prompt, responses], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def shown_order(labeler: str, key: str, k: int) -> list[int]:
    """A per-labeler shuffle, seeded by (labeler, task) so it is reproducible, and stored anyway."""
    order = list(range(k))
    random.Random(f"{labeler}\0{key}").shuffle(order)
    return order


@dataclass(frozen=True)
class Task:
    prompt: Any
    responses: list
    source: str = ""


@dataclass(frozen=True)
class Assignment:
    task_id: int
    labeler: str
    prompt: Any
    responses: list       # original order
    order: list[int]      # order[pos] = original index shown at display position pos
    status: str


def database_url(db: str) -> str:
    """``--db``: a URL (``postgresql+psycopg://...``, ``sqlite:///...``) or a path to a SQLite file."""
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


def _hide_password(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "the --db URL"


def _sqlite_setup(engine: sa.Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # sqlite3's own implicit BEGIN is DEFERRED; we issue ours
        cur = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=30000"):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class Store:
    """All reads and writes of the label database; each public method is one transaction."""

    def __init__(self, db: str, *, create: bool = True):
        url = database_url(db)
        self.url = url
        self.display = db if "://" not in db else _hide_password(url)  # for messages: never print a password
        is_sqlite = url.startswith("sqlite")
        if is_sqlite and not create:
            path = url.split(":///", 1)[-1]
            if path and not Path(path).is_file():
                raise InputError("label database not found", file=path, field="db")
        try:
            kwargs = {"connect_args": {"check_same_thread": False, "timeout": 30}} if is_sqlite \
                else {"pool_pre_ping": True}
            self.engine = sa.create_engine(url, **kwargs)
        except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as e:
            hint = " (PostgreSQL needs: pip install 'alignkit[postgres]')" if "postgres" in url else ""
            raise InputError(f"cannot open the database URL: {e}{hint}", field="db") from None
        if is_sqlite:
            _sqlite_setup(self.engine)
        try:
            self._init_schema(create)
        except DBAPIError as e:  # unreachable server, not a database file, no permission
            raise InputError(f"cannot open the label database: {e.orig}", file=self.display, field="db") from None

    def _init_schema(self, create: bool) -> None:
        if create:
            metadata.create_all(self.engine)
        with self.engine.begin() as c:
            if not sa.inspect(c).has_table("meta"):
                raise InputError("not an alignkit label database (no 'meta' table)", field="db")
            version = c.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
            if version is None and create:
                c.execute(meta.insert().values(key="schema_version", value=SCHEMA_VERSION))
            elif version != SCHEMA_VERSION:
                raise InputError(f"label database schema {version!r}, this alignkit reads {SCHEMA_VERSION!r}",
                                 field="db")

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ tasks and labelers

    def add_tasks(self, new: list[Task]) -> int:
        """Insert the tasks not already present (by content key); returns how many were new."""
        with self.engine.begin() as c:
            known = set(c.execute(sa.select(tasks.c.key)).scalars())
            rows, stamp = [], now()
            for t in new:
                key = task_key(t.prompt, t.responses)
                if key not in known:
                    known.add(key)
                    rows.append({"key": key, "prompt": t.prompt, "responses": t.responses, "source": t.source,
                                 "created_at": stamp})
            if rows:
                c.execute(tasks.insert(), rows)
        return len(rows)

    def task_count(self) -> int:
        with self.engine.begin() as c:
            return c.execute(sa.select(sa.func.count()).select_from(tasks)).scalar_one()

    def ensure_labeler(self, name: str) -> None:
        try:
            with self.engine.begin() as c:
                if c.execute(sa.select(labelers.c.name).where(labelers.c.name == name)).first() is None:
                    c.execute(labelers.insert().values(name=name, created_at=now()))
        except IntegrityError:
            pass  # the same name logged in twice at once: it exists, which is all we wanted

    # ------------------------------------------------------------------ assignment

    def _open_tasks(self, labeler: str, per_task: int):
        """Tasks this labeler has no assignment for and that still need labelers (skips don't count)."""
        mine = sa.select(assignments.c.task_id).where(assignments.c.labeler == labeler)
        taken = (sa.select(sa.func.count()).select_from(assignments)
                 .where(assignments.c.task_id == tasks.c.id, assignments.c.status != SKIPPED)
                 .scalar_subquery())
        return tasks.c.id.not_in(mine) & (taken < per_task)

    def next_task(self, labeler: str, per_task: int) -> int | None:
        """The labeler's oldest pending task, else a new assignment (lowest task id first), else None."""
        for _attempt in range(3):
            try:
                return self._next_task_once(labeler, per_task)
            except IntegrityError:
                continue  # the same labeler asked twice at once; the other request made the assignment
        return self._next_task_once(labeler, per_task)

    def _next_task_once(self, labeler: str, per_task: int) -> int | None:
        with self.engine.begin() as c:
            pending = c.execute(sa.select(assignments.c.task_id)
                                .where(assignments.c.labeler == labeler, assignments.c.status == PENDING)
                                .order_by(assignments.c.id).limit(1)).scalar()
            if pending is not None:
                return pending
            row = c.execute(sa.select(tasks.c.id, tasks.c.key, tasks.c.responses)
                            .where(self._open_tasks(labeler, per_task)).order_by(tasks.c.id).limit(1)).first()
            if row is None:
                return None
            stamp = now()
            c.execute(assignments.insert().values(
                task_id=row.id, labeler=labeler, shown_order=shown_order(labeler, row.key, len(row.responses)),
                status=PENDING, assigned_at=stamp, updated_at=stamp))
            return row.id

    def assignment(self, labeler: str, task_id: int) -> Assignment | None:
        with self.engine.begin() as c:
            row = c.execute(sa.select(tasks.c.prompt, tasks.c.responses, assignments.c.shown_order,
                                      assignments.c.status)
                            .join(tasks, tasks.c.id == assignments.c.task_id)
                            .where(assignments.c.labeler == labeler, assignments.c.task_id == task_id)).first()
        if row is None:
            return None
        return Assignment(task_id, labeler, row.prompt, list(row.responses), list(row.shown_order), row.status)

    def previous_task(self, labeler: str, task_id: int) -> int | None:
        """The task this labeler was given before ``task_id`` (the Back button)."""
        with self.engine.begin() as c:
            this = c.execute(sa.select(assignments.c.id).where(assignments.c.labeler == labeler,
                                                               assignments.c.task_id == task_id)).scalar()
            query = sa.select(assignments.c.task_id).where(assignments.c.labeler == labeler)
            if this is not None:
                query = query.where(assignments.c.id < this)
            return c.execute(query.order_by(assignments.c.id.desc()).limit(1)).scalar()

    def progress(self, labeler: str, per_task: int) -> tuple[int, int]:
        """(tasks this labeler has finished or skipped, that + pending + still open to them)."""
        with self.engine.begin() as c:
            counts = dict(c.execute(sa.select(assignments.c.status, sa.func.count())
                                    .where(assignments.c.labeler == labeler).group_by(assignments.c.status)).all())
            open_ = c.execute(sa.select(sa.func.count()).select_from(tasks)
                              .where(self._open_tasks(labeler, per_task))).scalar_one()
        finished = counts.get(DONE, 0) + counts.get(SKIPPED, 0)
        return finished, finished + counts.get(PENDING, 0) + open_

    # ------------------------------------------------------------------ labels

    def submit(self, labeler: str, task_id: int, *, ranks: list[int] | None, rubric: list[dict] | None,
               note: str) -> int:
        """Store one label and mark the assignment done, in ONE transaction; returns the label id."""
        with self.engine.begin() as c:
            order = self._assigned_order(c, labeler, task_id)
            stamp = now()
            label_id = c.execute(labels.insert().values(
                task_id=task_id, labeler=labeler, ranks=ranks, rubric=rubric, note=note, shown_order=order,
                created_at=stamp)).inserted_primary_key[0]
            self._set_status(c, labeler, task_id, DONE, stamp)
        return label_id

    def skip(self, labeler: str, task_id: int) -> None:
        """Skip: the task goes back to the pool for others; an earlier label of it is withdrawn (kept as history)."""
        with self.engine.begin() as c:
            self._assigned_order(c, labeler, task_id)
            self._set_status(c, labeler, task_id, SKIPPED, now())

    @staticmethod
    def _assigned_order(c, labeler: str, task_id: int) -> list[int]:
        order = c.execute(sa.select(assignments.c.shown_order).where(
            assignments.c.labeler == labeler, assignments.c.task_id == task_id)).scalar()
        if order is None:
            raise KeyError(f"task {task_id} is not assigned to {labeler!r}")
        return list(order)

    @staticmethod
    def _set_status(c, labeler: str, task_id: int, status: str, stamp: str) -> None:
        c.execute(assignments.update()
                  .where(assignments.c.labeler == labeler, assignments.c.task_id == task_id)
                  .values(status=status, updated_at=stamp))

    def latest_label(self, labeler: str, task_id: int) -> dict | None:
        with self.engine.begin() as c:
            row = c.execute(sa.select(labels).where(labels.c.labeler == labeler, labels.c.task_id == task_id)
                            .order_by(labels.c.id.desc()).limit(1)).first()
        return None if row is None else dict(row._mapping)

    def current_labels(self) -> list[dict]:
        """The current label of every (task, labeler) whose assignment is done, with its task; by task, labeler."""
        newest = (sa.select(sa.func.max(labels.c.id).label("id"))
                  .group_by(labels.c.task_id, labels.c.labeler).subquery())
        query = (sa.select(labels, tasks.c.prompt, tasks.c.responses, tasks.c.source)
                 .join(newest, newest.c.id == labels.c.id)
                 .join(tasks, tasks.c.id == labels.c.task_id)
                 .join(assignments, (assignments.c.task_id == labels.c.task_id)
                       & (assignments.c.labeler == labels.c.labeler))
                 .where(assignments.c.status == DONE)
                 .order_by(labels.c.task_id, labels.c.labeler))
        with self.engine.begin() as c:
            return [dict(r._mapping) for r in c.execute(query)]

    def assignment_counts(self) -> dict[str, dict[str, int]]:
        """{labeler: {status: count}} for every labeler who logged in."""
        with self.engine.begin() as c:
            names = c.execute(sa.select(labelers.c.name).order_by(labelers.c.name)).scalars().all()
            rows = c.execute(sa.select(assignments.c.labeler, assignments.c.status, sa.func.count())
                             .group_by(assignments.c.labeler, assignments.c.status)).all()
        out = {name: {PENDING: 0, DONE: 0, SKIPPED: 0} for name in names}
        for name, status, n in rows:
            out.setdefault(name, {PENDING: 0, DONE: 0, SKIPPED: 0})[status] = n
        return out
