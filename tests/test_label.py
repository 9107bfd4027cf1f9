"""alignkit label: input checks, the store, the form, security, durability, export and stats.

The browser end to end (Playwright + Chromium) is in test_label_browser.py; it reuses ``served``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager

import httpx
import pytest
from starlette.testclient import TestClient

from alignkit.label import cli as label_cli
from alignkit.label.app import create_app
from alignkit.label.export import rubric_ranks
from alignkit.label.forms import parse_submission
from alignkit.label.stats import kendall_tau_b, pair_agreement
from alignkit.label.store import Store, Task
from alignkit.rubric import DEFAULT_WEIGHTS, FLAGS, rubric_score

TOKEN = "test-token-0123456789"
XSS = ["<script>document.title='pwned';alert(1)</script> plain words",
       "<img src=x onerror=\"document.title='pwned';alert(2)\">"]


def task_rows(n: int, k: int = 4) -> list[dict]:
    return [{"prompt": f"Question {i}: what is {i} + {i}?",
             "responses": [f"answer {i}.{j}: {2 * i + j - 1}" for j in range(k)]} for i in range(n)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- pure pieces

def test_kendall_tau_b_golden_values():
    """Hand-counted pairs (n_0 = 6 for n = 4).

    x=(1,2,3,4), y=(1,3,2,4): 5 concordant, 1 discordant (2,3), no ties -> (5-1)/6 = 2/3.
    x=(1,1,2,3), y=(1,2,2,3): pair (0,1) tied in x, (1,2) tied in y, the other 4 concordant ->
    4 / sqrt((6-1)(6-1)) = 0.8 (scipy.stats.kendalltau gives 0.8 too).
    x=(1,2,3), y=(3,2,1): all 3 discordant -> -1. An all-tied ranking has no tau-b.
    """
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3, abs=1e-12)
    assert kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8, abs=1e-12)
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau_b([1, 2, 2], [1, 2, 2]) == 1.0  # identical rankings with a tie: exactly 1
    assert kendall_tau_b([1, 1, 1], [1, 2, 3]) is None
    # tau-b with ties differs from tau-a: (n_c - n_d) / n_0 would be 4/6 for the second case
    assert kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) != pytest.approx(4 / 6)


def test_pair_agreement_counts_ties_as_a_relation():
    # pairs: (0,1) <,< same; (0,2) <,= differ; (1,2) >,> ... x=(1,2,2) y=(1,3,1)
    assert pair_agreement([1, 2, 2], [1, 3, 1]) == (1, 3)
    assert pair_agreement([1, 2, 2, 4], [1, 2, 2, 4]) == (6, 6)


def test_form_maps_display_positions_back_to_the_original_order():
    order = [2, 0, 3, 1]  # position p shows original response order[p]
    form = {"rank_0": "1", "rank_1": "3", "rank_2": "3", "rank_3": "2",
            "overall_0": "7", "overall_1": "2", "overall_2": "2", "overall_3": "5",
            "flag_1_hallucination": "on", "note": "tie between two"}
    parsed = parse_submission(form, order)
    assert parsed.errors == []
    assert parsed.ranks == [3, 2, 1, 3]  # original 2 shown first and ranked 1, ...
    assert [r["overall"] for r in parsed.rubric] == [2, 5, 7, 2]
    assert parsed.rubric[0]["hallucination"] is True and not any(parsed.rubric[1][f] for f in FLAGS)
    assert parsed.note == "tie between two"


@pytest.mark.parametrize("form, message", [
    ({"rank_0": "1", "rank_1": "2"}, "Rank every response or none; not ranked: C"),
    ({"overall_0": "3", "overall_1": "3", "overall_2": ""}, "missing: C"),
    ({"rank_0": "9", "rank_1": "1", "rank_2": "2"}, "Rank of A must be a whole number from 1 to 3"),
    ({"overall_0": "8", "overall_1": "1", "overall_2": "1"}, "from 1 to 7"),
    ({"flag_0_hallucination": "on"}, "Flags need an overall quality"),
    ({}, "Rank the responses, or score each one"),
])
def test_form_refuses_partial_or_bad_labels(form, message):
    parsed = parse_submission(form, [0, 1, 2])
    assert any(message in e for e in parsed.errors), parsed.errors
    assert parsed.ranks is None and parsed.rubric is None


def test_rubric_ranks_follow_the_rule_and_keep_ties():
    rubric = [{"overall": 5, "hallucination": 1}, {"overall": 3}, {"overall": 6}, {"overall": 3}]
    # default scores 3, 3, 6, 3 -> one winner, three tied second
    assert rubric_ranks(rubric, DEFAULT_WEIGHTS) == [2, 2, 1, 2]
    no_penalty = {**DEFAULT_WEIGHTS, "hallucination": 0.0}  # scores 5, 3, 6, 3
    assert rubric_ranks(rubric, no_penalty) == [2, 3, 1, 3]


# ----------------------------------------------------------------------------- bad input to serve

@pytest.mark.parametrize("lines, place", [
    ([json.dumps(task_rows(1)[0]), json.dumps({"prompt": "p", "responses": ["only one"]})],
     "line 2, field 'responses': needs 2 to 9 responses (K), got 1"),
    ([json.dumps(task_rows(1)[0]), "", '{"prompt": "p", "responses": ["a", "b"'],
     "line 3, field 'row': invalid JSON"),
    ([json.dumps({"prompt": "p", "responses": ["a", ""]})], "line 1, field 'responses[1]': is empty"),
    ([json.dumps({"responses": ["a", "b"]})], "line 1, field 'prompt': missing"),
])
def test_serve_bad_input_exits_2_naming_file_line_field(tmp_path, capsys, lines, place):
    data = tmp_path / "to_label.jsonl"
    data.write_text("\n".join(lines) + "\n")
    db = tmp_path / "labels.sqlite"
    assert label_cli.main(["serve", "--data", str(data), "--db", str(db), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alignkit: error: ") and str(data) in err and place in err, err
    assert "\n" not in err and "Traceback" not in err
    assert not db.exists()  # every row is checked before the database is created


def test_cli_bad_arguments_exit_2(tmp_path, capsys):
    assert label_cli.main(["export", "--db", str(tmp_path / "none.sqlite"), "--output", str(tmp_path / "o")]) == 2
    assert "none.sqlite, field 'db': label database not found" in capsys.readouterr().err
    assert label_cli.main(["serve", "--db", str(tmp_path / "x.sqlite"), "--per-task", "0"]) == 2
    assert "--per-task" in capsys.readouterr().err
    assert label_cli.main(["serve", "--db", str(tmp_path / "x.sqlite"), "--port", "0"]) == 2
    assert "field 'data': the database has no tasks" in capsys.readouterr().err
    assert label_cli.main(["stats", "--db", "postgresql+nosuchdriver://u:secret@h/db"]) == 2
    err = capsys.readouterr().err
    assert "field 'db'" in err and "secret" not in err


# ----------------------------------------------------------------------------- the store

PG_URL = os.environ.get("ALIGNKIT_TEST_POSTGRES_URL")  # a server where this user may CREATE DATABASE


@contextmanager
def fresh_postgres_database():
    """A new, empty database on the test server (dropped afterwards), so no real data is ever touched."""
    import uuid

    import sqlalchemy as sa

    name = f"alignkit_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.engine.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.dispose()


# every test that takes `db` runs on SQLite, and on PostgreSQL too when a server is given
@pytest.fixture(params=["sqlite", "postgresql"] if PG_URL else ["sqlite"])
def db(request, tmp_path):
    """The --db argument: a SQLite file path, or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        yield str(tmp_path / "labels.sqlite")
    else:
        with fresh_postgres_database() as url:
            yield url


@pytest.fixture
def store(db):
    s = Store(db)
    yield s
    s.close()


@pytest.mark.skipif(not PG_URL, reason="set ALIGNKIT_TEST_POSTGRES_URL to run the store tests on PostgreSQL too")
def test_postgresql_store_opens_with_the_same_schema():
    with fresh_postgres_database() as url:
        store = Store(url)
        assert store.task_count() == 0 and "postgresql" in store.url
        store.close()
        Store(url, create=False).close()  # export/stats open it without creating anything


def test_adding_the_same_tasks_twice_adds_nothing(store):
    assert store.add_tasks([Task(r["prompt"], r["responses"]) for r in task_rows(3)]) == 3
    assert store.add_tasks([Task(r["prompt"], r["responses"]) for r in task_rows(4)]) == 1
    assert store.task_count() == 4


def test_sqlite_store_is_wal_with_full_sync(tmp_path):
    store = Store(str(tmp_path / "labels.sqlite"))
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL: a commit is on disk
    store.close()


def test_assignment_per_task_order_skip_and_back(store):
    store.add_tasks([Task(r["prompt"], r["responses"]) for r in task_rows(3)])
    for name in ("ana", "ben", "cy"):
        store.ensure_labeler(name)
    # two labelers per task: ana and ben both get task 1, cy gets task 2
    assert store.next_task("ana", 2) == 1 and store.next_task("ben", 2) == 1 and store.next_task("cy", 2) == 2
    assert store.next_task("ana", 2) == 1  # a pending task is given again until done or skipped
    a, b = store.assignment("ana", 1), store.assignment("ben", 1)
    assert sorted(a.order) == [0, 1, 2, 3] and a.order == store.assignment("ana", 1).order  # remembered
    assert a.order != b.order  # shuffled per labeler (fixed seeds: these two differ)
    store.skip("ana", 1)
    assert store.next_task("ana", 2) == 2  # ana's skip frees her slot on task 1 ...
    assert store.next_task("cy", 2) == 2   # ... cy still has task 2 pending
    assert store.previous_task("ana", 2) == 1 and store.previous_task("ana", 1) is None
    assert store.progress("ana", 2) == (1, 3)  # skipped 1; pending 2; task 3 still open to her
    assert store.assignment("ana", 3) is None


def test_concurrent_submissions_to_the_store_all_land(store):
    store.add_tasks([Task(r["prompt"], r["responses"]) for r in task_rows(8)])
    names = ["ana", "ben", "cy", "dee"]
    for n in names:
        store.ensure_labeler(n)
    barrier, errors = threading.Barrier(len(names)), []

    def work(name):
        try:
            barrier.wait()
            while (task := store.next_task(name, len(names))) is not None:
                store.submit(name, task, ranks=[1, 2, 3, 4], rubric=None, note=name)
        except Exception as e:  # noqa: BLE001 - report any failure of a worker to the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert errors == []
    labels = store.current_labels()
    assert len(labels) == 8 * len(names)
    assert {(x["task_id"], x["labeler"]) for x in labels} == {(t, n) for t in range(1, 9) for n in names}


# ----------------------------------------------------------------------------- the app over HTTP

def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', html).group(1)


@pytest.fixture
def client(store):
    rows = task_rows(2)
    rows[0]["responses"][1:3] = XSS
    store.add_tasks([Task(r["prompt"], r["responses"]) for r in rows])
    return TestClient(create_app(store, token=TOKEN, per_task=1))


def login(client: TestClient, name: str = "ana") -> httpx.Response:
    page = client.get(f"/?token={TOKEN}")
    return client.post("/login", data={"name": name, "csrf": csrf_of(page.text)})


def test_requests_without_the_token_are_refused(client):
    for path in ("/", "/next", "/task/1", "/static/label.js", "/static/label.css", "/nope"):
        r = client.get(path)
        assert r.status_code == 403 and "access token" in r.text, path
        assert "Content-Security-Policy" in r.headers
    assert client.get("/?token=wrong-token-xyz").status_code == 403
    assert client.post("/login", data={"name": "ana"}).status_code == 403
    r = client.get(f"/?token={TOKEN}", follow_redirects=False)  # first visit: cookie, token out of the URL
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/static/label.js").status_code == 200
    bearer = TestClient(client.app)  # scripts: a bearer header instead of the cookie
    assert bearer.get("/static/label.js", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_cross_origin_and_csrf_less_posts_are_refused(client, store):
    page = login(client)
    assert page.url.path == "/task/1"
    csrf = csrf_of(page.text)
    good = {"csrf": csrf, "rank_0": "1", "rank_1": "2", "rank_2": "3", "rank_3": "4"}
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Referer": "http://evil.example/page"}, {"Origin": "http://testserver.evil.example"}):
        r = client.post("/task/1", data=good, headers=headers)
        assert r.status_code == 403 and "cross-origin" in r.text, headers
    assert client.post("/task/1", data={**good, "csrf": "0" * 64}).status_code == 403
    assert client.post("/task/1", data={k: v for k, v in good.items() if k != "csrf"}).status_code == 403
    assert client.post("/task/1", data=good, headers={"Origin": "https://testserver"}).status_code == 403
    assert store.current_labels() == []
    r = client.post("/task/1", data=good, headers={"Origin": "http://testserver"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/next"
    assert len(store.current_labels()) == 1


def test_pages_escape_untrusted_text_and_send_a_strict_csp(client):
    page = login(client)
    html = page.text
    assert "<script>document.title" not in html and "<img src=x" not in html
    assert "&lt;script&gt;document.title=&#39;pwned&#39;;alert(1)&lt;/script&gt; plain words" in html
    assert "&lt;img src=x onerror=&#34;document.title" in html
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/label.js" defer>']
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    js = client.get("/static/label.js").text
    assert "innerHTML" not in js and "eval(" not in js


def test_partial_label_is_refused_with_the_form_kept(client, store):
    page = login(client)
    r = client.post("/task/1", data={"csrf": csrf_of(page.text), "rank_0": "1", "note": "half done"})
    assert r.status_code == 400 and "Rank every response or none" in r.text and "half done" in r.text
    assert store.current_labels() == []


def test_submit_reload_shows_the_label_and_back_and_skip_work(client, store):
    page = login(client)
    csrf = csrf_of(page.text)
    form = {"csrf": csrf, "rank_0": "2", "rank_1": "1", "rank_2": "2", "rank_3": "4", "note": "ok"}
    form |= {f"overall_{p}": str(p + 3) for p in range(4)} | {"flag_2_sexual_content": "on"}
    r = client.post("/task/1", data=form)
    assert r.url.path == "/task/2" and 'id="back"' in r.text and "/task/1" in r.text
    again = client.get("/task/1").text
    assert 'id="task-status">labelled' in again
    assert re.search(r'name="rank_1"[^>]*>\s*<option value="">&mdash;</option>\s*<option value="1" selected', again)
    assert 'id="overall-3-6" checked' in again and 'id="flag-2-sexual_content" checked' in again
    assert ">ok</textarea>" in again
    r = client.post("/task/2", data={"csrf": csrf, "action": "skip"})
    assert "No more tasks for you" in r.text and 'id="all-done"' in r.text
    (label,) = store.current_labels()
    order = store.assignment("ana", 1).order
    assert label["ranks"] == [[2, 1, 2, 4][order.index(i)] for i in range(4)]


def test_labeler_allowlist(store):
    store.add_tasks([Task(r["prompt"], r["responses"]) for r in task_rows(1)])
    client = TestClient(create_app(store, token=TOKEN, labelers=["ana", "ben"]))
    page = client.get(f"/?token={TOKEN}")
    assert '<option value="ana">' in page.text
    r = client.post("/login", data={"name": "eve", "csrf": csrf_of(page.text)})
    assert r.status_code == 400 and "Unknown labeler" in r.text
    assert client.post("/login", data={"name": "ben", "csrf": csrf_of(page.text)}).url.path == "/task/1"


# ----------------------------------------------------------------------------- a real server process

@contextmanager
def served(data, db, *extra, timeout: float = 90):
    """``alignkit label serve --port 0`` as a child process; yields (url with token, process)."""
    cmd = [sys.executable, "-m", "alignkit.label.cli", "serve", "--db", str(db), "--port", "0", "--token", TOKEN]
    if data is not None:
        cmd += ["--data", str(data)]
    proc = subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(timeout, proc.kill)  # a server that never starts fails the test, not hangs it
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if match := re.search(r"open (http://\S+)", line):
                break
        else:
            raise AssertionError("the server did not start:\n" + "".join(lines))
        watchdog.cancel()
        yield match.group(1), proc
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()


class Labeler:
    """A labeler's browser session over plain HTTP (cookie jar, CSRF token from the page)."""

    def __init__(self, url: str, name: str):
        base = url.split("/?")[0]
        self.http = httpx.Client(base_url=base, follow_redirects=True, timeout=30)
        page = self.http.get(url)
        page = self.http.post("/login", data={"name": name, "csrf": csrf_of(page.text)})
        self.page = page

    def submit_current(self, ranks: list[int]) -> int | None:
        """Submit ranks (by display position) on the task shown; returns its id (None when all done)."""
        match = re.match(r"/task/(\d+)$", self.page.url.path)
        if match is None:
            return None
        form = {"csrf": csrf_of(self.page.text), **{f"rank_{p}": str(r) for p, r in enumerate(ranks)}}
        self.page = self.http.post(self.page.url.path, data=form, headers={"Origin": str(self.http.base_url)})
        assert self.page.status_code == 200, self.page.text
        return int(match.group(1))


def test_two_labelers_at_once_then_kill_9_loses_no_submission(tmp_path):
    """Both labelers submit concurrently; the server is SIGKILLed right after the last answer."""
    data = write_jsonl(tmp_path / "to_label.jsonl", task_rows(6))
    db = tmp_path / "labels.sqlite"
    submitted: dict[str, list[int]] = {}
    with served(data, db, "--per-task", "2") as (url, proc):
        people = [Labeler(url, "ana"), Labeler(url, "ben")]
        barrier = threading.Barrier(2)

        def work(person, name):
            barrier.wait()
            done = []
            while (task := person.submit_current([1, 2, 2, 4])) is not None:
                done.append(task)
            submitted[name] = done

        threads = [threading.Thread(target=work, args=(p, n)) for p, n in zip(people, ("ana", "ben"))]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        os.kill(proc.pid, signal.SIGKILL)  # no shutdown, no flush: only what was committed survives
        proc.wait(10)
    assert submitted == {"ana": list(range(1, 7)), "ben": list(range(1, 7))}
    store = Store(str(db), create=False)
    try:
        labels = store.current_labels()
    finally:
        store.close()
    assert sorted((x["task_id"], x["labeler"]) for x in labels) == \
        sorted((t, n) for t in range(1, 7) for n in ("ana", "ben"))
    assert all(sorted(x["ranks"]) == [1, 2, 2, 4] for x in labels)


# ----------------------------------------------------------------------------- export and stats

def _labelled_db(db: str) -> tuple[str, list[dict]]:
    """A database with ranked, rubric-only, both, and all-tied labels; returns (db, what was stored)."""
    s = Store(db)
    s.add_tasks([Task(r["prompt"], r["responses"]) for r in task_rows(4)])
    rubric = [{"overall": 6, **{f: False for f in FLAGS}}, {"overall": 4, **{f: False for f in FLAGS}},
              {"overall": 4, **{f: False for f in FLAGS}, "hallucination": True},
              {"overall": 2, **{f: False for f in FLAGS}, "satisfies_constraint": True}]
    given = [("ana", {"ranks": [2, 1, 2, 4], "rubric": None}), ("ana", {"ranks": None, "rubric": rubric}),
             ("ana", {"ranks": [1, 3, 2, 3], "rubric": rubric}), ("ana", {"ranks": [1, 1, 1, 1], "rubric": None})]
    for name, label in given:
        s.ensure_labeler(name)
        task = s.next_task(name, 1)
        s.submit(name, task, note=f"task {task}", **label)
    s.close()
    return db, [label for _, label in given]


def comparisons_of(ranks):
    return sorted((i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j])


def test_export_round_trip_through_the_reward_model_loader(db, tmp_path, capsys):
    from alignkit.data.ranking import validate_ranking_row
    from alignkit.rubric import validate_labels

    db, given = _labelled_db(db)
    out = tmp_path / "ranked.jsonl"
    assert label_cli.main(["export", "--db", db, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 rows" in printed and "1 left out: all responses tied" in printed
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [1, 2, 3]  # task 4 (all tied) has nothing to compare
    assert [r["rank_source"] for r in rows] == ["labeler", "rubric", "labeler"]
    assert all(r["labeler"] == "ana" and re.match(r"\d{4}-\d\d-\d\dT.*Z$", r["labeled_at"]) for r in rows)
    for n, (row, label) in enumerate(zip(rows, given[:3]), start=1):
        ex = validate_ranking_row(row, (str(out), n))  # the loader `alignkit rm` uses
        expected = label["ranks"] or rubric_ranks(label["rubric"], DEFAULT_WEIGHTS)
        assert sorted((i, j) for i, j, _ in ex.comparisons) == comparisons_of(expected)
        assert row["ranks"] == expected and row["responses"] == task_rows(4)[n - 1]["responses"]
        if label["rubric"]:
            read = [validate_labels(v, f"rubric[{i}]", (str(out), n)) for i, v in enumerate(row["rubric"])]
            assert [rubric_score(r) for r in read] == [rubric_score(r) for r in label["rubric"]]
            assert [r["overall"] for r in read] == [v["overall"] for v in label["rubric"]]
            rubric_only = {k: v for k, v in row.items() if k != "ranks"}  # the loader's own rubric rule agrees
            if label["ranks"] is None:
                assert sorted(c[:2] for c in validate_ranking_row(rubric_only, (str(out), n)).comparisons) == \
                    comparisons_of(row["ranks"])
    # ties stay ties: (0, 2) of task 1 form no comparison either way
    assert (0, 2) not in comparisons_of(rows[0]["ranks"]) and (2, 0) not in comparisons_of(rows[0]["ranks"])
    assert label_cli.main(["export", "--db", db, "--output", str(out)]) == 2  # no silent overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ranked")] == []  # no temp file left


def test_export_uses_the_rubric_weights_file(tmp_path):
    db, _ = _labelled_db(str(tmp_path / "labels.sqlite"))
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({"hallucination": 0, "satisfies_constraint": 5}))
    out = tmp_path / "ranked.jsonl"
    assert label_cli.main(["export", "--db", db, "--output", str(out), "--rubric-weights", str(weights)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    # scores with these weights: 6, 4, 4 (hallucination costs 0 now), 2 + 5 = 7
    assert rows[1]["ranks"] == [2, 3, 3, 1] and rows[1]["rank_source"] == "rubric"


def test_every_flag_can_come_from_a_config_file(tmp_path, capsys):
    """DESIGN.md: every flag is settable from --config. The file's values pass the flags' own
    checks, the command line wins over the file, and a bad field names file, line and field."""
    db, _ = _labelled_db(str(tmp_path / "labels.sqlite"))
    out = tmp_path / "ranked.jsonl"
    cfg = tmp_path / "label.yaml"
    cfg.write_text(f"db: {db}\noutput: {tmp_path / 'from-file.jsonl'}\noverwrite: true\n")
    assert label_cli.main(["export", "--config", str(cfg), "--output", str(out)]) == 0
    assert out.is_file() and not (tmp_path / "from-file.jsonl").exists()  # the flag won
    assert label_cli.main(["export", "--config", str(cfg), "--output", str(out)]) == 0  # overwrite: true applied
    cfg.write_text(f"db: {db}\njson: true\n")
    capsys.readouterr()
    assert label_cli.main(["stats", "--config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == 4  # json: true applied
    for text, line, field, says in [(f"db: {db}\nbogus: 1\n", 2, "bogus", "unknown field"),
                                     (f"db: {db}\nper-task: 0\n", 2, "per_task", "must be at least 1"),
                                     (f"db: {db}\nport: [1]\n", 2, "port", "single value"),
                                     ("host: 0.0.0.0\n", None, "db", "required")]:
        cfg.write_text(text)
        assert label_cli.main(["serve", "--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert f"field '{field}'" in err and says in err and "Traceback" not in err, err
        if line:
            assert f"{cfg}, line {line}" in err, err
    cfg.write_text(f"db: {db}\njson: yes please\n")
    assert label_cli.main(["stats", "--config", str(cfg)]) == 2
    assert "line 2, field 'json': must be true or false" in capsys.readouterr().err


def test_stats_counts_and_agreement(db, capsys):
    """ana and ben share tasks 1 and 2, cy labels task 3 alone.

    task 1: ana (1,2,3,4), ben (1,3,2,4): 5 of 6 response pairs agree; tau-b = 2/3.
    task 2: ana (1,1,2,3), ben (1,2,2,3): pairs (0,1) and (1,2) differ, 4 of 6 agree; tau-b = 0.8.
    Pooled agreement 9/12 = 0.75; mean tau-b (2/3 + 0.8)/2 = 0.7333.
    """
    s = Store(db)
    s.add_tasks([Task(r["prompt"], r["responses"]) for r in task_rows(4)])
    given = {"ana": [[1, 2, 3, 4], [1, 1, 2, 3]], "ben": [[1, 3, 2, 4], [1, 2, 2, 3]], "cy": [[4, 3, 2, 1]]}
    for name, rankings in given.items():
        s.ensure_labeler(name)
        for ranks in rankings:
            s.submit(name, s.next_task(name, 2), ranks=ranks, rubric=None, note="")
    s.ensure_labeler("dee")
    s.next_task("dee", 2)  # one pending assignment
    s.close()
    assert label_cli.main(["stats", "--db", db, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["tasks"] == 4 and stats["labels"] == 5
    assert stats["tasks_by_number_of_labels"] == {"0": 1, "1": 1, "2": 2}
    assert stats["labelers"] == {"ana": {"labelled": 2, "skipped": 0, "pending": 0},
                                 "ben": {"labelled": 2, "skipped": 0, "pending": 0},
                                 "cy": {"labelled": 1, "skipped": 0, "pending": 0},
                                 "dee": {"labelled": 0, "skipped": 0, "pending": 1}}
    (pair,) = stats["pairs"]
    assert (pair["a"], pair["b"], pair["shared_tasks"], pair["response_pairs"]) == ("ana", "ben", 2, 12)
    assert pair["agreement"] == pytest.approx(0.75, abs=1e-12)
    assert pair["kendall_tau_b"] == pytest.approx((2 / 3 + 0.8) / 2, abs=1e-12)
    assert label_cli.main(["stats", "--db", db]) == 0
    table = capsys.readouterr().out
    assert re.search(r"ana\s+ben\s+2\s+12\s+0\.750\s+0\.733", table), table
