"""The admin dashboard: is the assistant helping, for whom, since which adapter, and what
exactly did it suggest. Pages are rendered on the server from the same queries as the
terminal views (feedback.logs, feedback.stats); the only state it changes is the adapter
registry (promote, roll back), through POSTs guarded as feedback.admin_web.auth says."""

from __future__ import annotations

import difflib
import json
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from feedback import adapter_rows, logs, replays, stats
from feedback.admin_cli import pair_records, run_record
from feedback.admin_web.auth import COOKIE, CSRF_FIELD, Guard, safe_next, same_origin
from feedback.admin_web.charts import line_chart
from feedback.logs import BASE_ADAPTER, LogFilter
from feedback.schema import COMPLETION_OUTCOMES, TrainingRun

log = logging.getLogger(__name__)

PAGE_SIZE = 50
DEFAULT_WINDOW = "30d"
OPEN_PATHS = {"/login"}


class PageError(Exception):
    """An answer other than the page: status and a message for the person asking."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _templates() -> Jinja2Templates:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,  # stored code is shown everywhere: escape all of it
        undefined=jinja2.StrictUndefined,
    )
    environment.filters["pct"] = lambda v: "-" if v is None else f"{v:.0%}"
    environment.filters["num"] = lambda v, f="{:.2f}": "-" if v is None else f.format(v)
    environment.filters["when"] = lambda v: "" if v is None else f"{logs.aware(v):%Y-%m-%d %H:%M}"
    environment.filters["pretty"] = lambda v: json.dumps(v, indent=2, default=str)
    environment.filters["lift"] = replays.format_lift
    environment.filters["interval"] = lambda v: replays.format_interval(v, "{:+.2f}")
    return Jinja2Templates(env=environment)


class Dashboard:
    """The routes and what they share: the engine, the guard, the templates."""

    def __init__(self, engine: Engine, guard: Guard, data_dir: Path) -> None:
        self.engine = engine
        self.guard = guard
        self.data_dir = data_dir
        self.templates = _templates()

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        context.setdefault("error", None)
        return self.templates.TemplateResponse(
            request,
            name,
            {"csrf_field": CSRF_FIELD, "csrf_token": self.guard.csrf_token(), **context},
            status_code=status,
        )

    # --- access --------------------------------------------------------------------------

    async def check_access(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        bearer = self.guard.by_bearer(request)
        if not bearer and not self.guard.by_cookie(request):
            wanted = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return self.login_page(request, status=401, next_path=wanted)
        return await call_next(request)

    async def posted_form(self, request: Request) -> FormData:
        """The form of a state-changing POST, once it has shown it comes from the dashboard:
        a browser's must carry the page's CSRF token and no foreign origin (a script with
        the bearer token is not a browser that another site can steer)."""
        form = await request.form()
        if not self.guard.by_bearer(request) and (
            not same_origin(request) or not self.guard.csrf_matches(str(form.get(CSRF_FIELD, "")))
        ):
            log.warning("refused a cross-site or token-less POST to %s", request.url.path)
            raise PageError(
                403,
                "refused: this form did not come from the dashboard (CSRF check failed); "
                "reload the page and try again",
            )
        return form

    async def page_error(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, PageError)
        return self.render(request, "message.html", error.status, message=error.message)

    def login_page(
        self, request: Request, *, status: int, next_path: str | None, error: str | None = None
    ) -> Response:
        return self.templates.TemplateResponse(
            request,
            "login.html",
            {"next": safe_next(next_path), "error": error},
            status_code=status,
            headers={"WWW-Authenticate": 'Bearer realm="ghostloop admin"'},
        )

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            return self.login_page(request, status=200, next_path=request.query_params.get("next"))
        form = await request.form()
        next_path = safe_next(str(form.get("next", "/")))
        if not same_origin(request):
            return Response("refused: cross-site login", status_code=403)
        if not self.guard.token_matches(str(form.get("token", ""))):
            return self.login_page(
                request,
                status=401,
                next_path=next_path,
                error="That is not the admin token. It is in the admin-token file of the data "
                "directory ('ghostloop config' shows where).",
            )
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(COOKIE, self.guard.session, httponly=True, samesite="strict")
        return response

    async def logout(self, request: Request) -> Response:
        await self.posted_form(request)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    # --- reading -------------------------------------------------------------------------

    def session(self) -> Session:
        return Session(self.engine)

    def query(self, work: Callable[[Session], Any]) -> Any:
        try:
            with self.session() as session:
                return work(session)
        except OperationalError as error:
            where = self.engine.url.render_as_string(hide_password=True)
            raise PageError(
                503,
                f"cannot read the database at {where}: {' '.join(str(error.orig).split())} — "
                "check GHOSTLOOP_DATABASE_URL and that the database server is running",
            ) from None

    def where(self, request: Request, default_since: str | None = None) -> LogFilter:
        params = request.query_params
        try:
            since = params.get("since", default_since) or None
            until = params.get("until") or None
            return LogFilter(
                user=params.get("user") or None,
                language=params.get("language") or None,
                adapter=params.get("adapter") or None,
                outcome=params.get("outcome") or None,
                since=logs.parse_time(since) if since else None,
                until=logs.parse_time(until) if until else None,
            )
        except ValueError as error:
            raise PageError(400, f"bad filter: {error}") from None

    def overview(self, request: Request) -> Response:
        where = self.where(request, DEFAULT_WINDOW)
        by_day_adapter, by_day, by_adapter, total = self.query(
            lambda s: stats.stats_for(
                session=s, groupings=[("day", "adapter"), ("day",), ("adapter",), ()], where=where
            )
        )
        saved: dict[str, list[tuple[str, float | None]]] = defaultdict(list)
        accepted: dict[str, list[tuple[str, float | None]]] = defaultdict(list)
        kept: dict[str, list[tuple[str, float | None]]] = defaultdict(list)
        for row in by_day_adapter:
            day, adapter = row.key
            saved[adapter].append((day, row.chars_saved_per_completion))
            accepted[adapter].append((day, row.acceptance))
            kept[adapter].append((day, row.survival_weighted_acceptance))
        days = [row.key[0] for row in by_day]
        charts = {
            "chars saved per completion, by adapter": line_chart(
                saved, title="characters saved per completion"
            ),
            "acceptance, by adapter": line_chart(
                accepted, title="acceptance", y_format="{:.0%}".format
            ),
            "survival: kept / suggested characters, by adapter (beside the headline)": line_chart(
                kept, title="kept / suggested", y_format="{:.0%}".format
            ),
            "latency (ms)": line_chart(
                {
                    "p50": list(zip(days, [r.latency_ms_p50 for r in by_day], strict=True)),
                    "p95": list(zip(days, [r.latency_ms_p95 for r in by_day], strict=True)),
                },
                title="latency ms",
                y_format="{:.0f}".format,
            ),
            "completions per day": line_chart(
                {"completions": [(r.key[0], float(r.completions)) for r in by_day]},
                title="completions",
                y_format="{:.0f}".format,
            ),
        }
        return self.render(
            request,
            "overview.html",
            where=where,
            since=request.query_params.get("since", DEFAULT_WINDOW),
            total=total[0] if total else None,
            charts=charts,
            by_adapter=by_adapter,
            statuses=self.query(lambda s: {a.version: a.status for a in adapter_rows.versions(s)}),
            replays=self.replays(),
        )

    def completions(self, request: Request) -> Response:
        where = self.where(request)
        try:
            page = max(1, int(request.query_params.get("page", "1")))
        except ValueError:
            raise PageError(400, "bad filter: page must be a whole number") from None
        rows, total = self.query(
            lambda s: (
                logs.records(
                    session=s, where=where, limit=PAGE_SIZE, offset=PAGE_SIZE * (page - 1)
                ),
                logs.count(session=s, where=where),
            )
        )
        return self.render(
            request,
            "completions.html",
            rows=rows,
            total=total,
            page=page,
            pages=max(1, -(-total // PAGE_SIZE)),
            where=where,
            filters=where.as_query_args(),
            outcomes=COMPLETION_OUTCOMES,
            base_adapter=BASE_ADAPTER,
        )

    def completion(self, request: Request) -> Response:
        completion_id = request.path_params["completion_id"]

        def work(session: Session) -> Any:
            try:
                return logs.detail(session=session, completion_id=completion_id)
            except logs.UnknownCompletionError as error:
                raise PageError(404, str(error)) from None

        found = self.query(work)
        return self.render(
            request,
            "completion.html",
            c=found.completion,
            events=found.events,
            final_text=found.final_text,
            final_from=found.final_from,
            diff=_diff(found.completion.suggestion, found.final_text),
        )

    def pairs(self, request: Request) -> Response:
        run_text = request.query_params.get("run") or None
        if run_text is not None and not run_text.isdigit():
            raise PageError(400, f"bad filter: run must be a run id, got {run_text!r}")
        run = int(run_text) if run_text else None
        rows = self.query(lambda s: pair_records(s, run, PAGE_SIZE * 4))
        return self.render(request, "pairs.html", rows=rows, run=run)

    def runs(self, request: Request) -> Response:
        rows = self.query(
            lambda s: [
                run_record(r)
                for r in s.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(200))
            ]
        )
        return self.render(request, "runs.html", rows=rows)

    def run(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        found = self.query(lambda s: s.get(TrainingRun, run_id))
        if found is None:
            raise PageError(404, f"no training run has id {run_id}")
        return self.render(request, "run.html", run=run_record(found))

    def adapter_list(self, request: Request, message: str | None = None) -> Response:
        rows = self.query(lambda s: [adapter_rows.record(a) for a in adapter_rows.versions(s)])
        return self.render(request, "adapters.html", rows=rows, message=message)

    async def adapter_action(self, request: Request) -> Response:
        form = await self.posted_form(request)
        action = request.path_params["action"]
        if action not in ("promote", "rollback"):
            raise PageError(404, f"no adapter action {action!r}: promote or rollback")
        version = str(form.get("version", "")).strip()

        def work(session: Session) -> str:
            with session.begin():
                if action == "promote":
                    if not version:
                        raise adapter_rows.AdapterStateError("name a version to promote")
                    return f"{adapter_rows.promote(session, version).version} is active"
                rolled, now = adapter_rows.rollback(session)
                return f"{rolled.version} rolled back; {now or 'the base model'} serves"

        try:
            message = self.query(work)
        except adapter_rows.AdapterStateError as error:
            raise PageError(409, f"nothing changed: {error}") from None
        log.info("admin: %s", message)
        return RedirectResponse(f"/adapters?{urlencode({'done': message})}", status_code=303)

    def adapters_page(self, request: Request) -> Response:
        return self.adapter_list(request, request.query_params.get("done"))

    # --- replays -------------------------------------------------------------------------

    def replays(self) -> list[dict[str, Any]]:
        """The replays run with this data dir (``ghostloop replay``), newest first."""
        found = []
        for name in replays.stored_names(self.data_dir, limit=10):
            try:
                report = replays.stored_report(self.data_dir, name)
            except replays.StoredReplayError as error:
                found.append({"name": name, "problem": str(error)})
                continue
            found.append(replays.overview_row(name, report))
        return found

    def replay(self, request: Request) -> Response:
        """One replay's whole report: every figure before and after on the held-out half
        with its interval, the paired lifts, line starts and mid-line, what each night did."""
        name = request.path_params["name"]
        try:
            report = replays.stored_report(self.data_dir, name)
        except replays.UnknownReplayError as error:
            raise PageError(404, str(error)) from None
        except replays.StoredReplayError as error:
            raise PageError(422, str(error)) from None
        methods = []
        for method, result in replays.methods_of(report).items():
            methods.append(
                {
                    "name": method,
                    "adapter": result.get("adapter"),
                    "message": result.get("message"),
                    "seconds": result.get("seconds"),
                    "gate_passed": result.get("gate_passed"),
                    "lift": replays.format_lift(
                        (result.get("paired_lift") or {}).get("chars_saved_relative")
                    ),
                    "rows": replays.method_rows(report["before"], result),
                }
            )
        return self.render(
            request,
            "replay.html",
            replay_name=name,
            description=replays.describe(report),
            methods=methods,
            reach=replays.format_reach(report["reach"]) if report.get("reach") else None,
            reactions=report.get("reactions") or {},
            chart=bool(report.get("chart"))
            and replays.stored_chart(self.data_dir, name) is not None,
        )

    def replay_chart(self, request: Request) -> Response:
        name = request.path_params["name"]
        path = replays.stored_chart(self.data_dir, name)
        if path is None:
            raise PageError(404, f"no replay chart named {name!r}")
        return FileResponse(path, media_type="image/png")


def _diff(suggested: str, final: str | None) -> list[tuple[str, str]]:
    """The suggestion against what stands now, as (kind, text) runs: same, del, ins."""
    if final is None:
        return []
    runs: list[tuple[str, str]] = []
    matcher = difflib.SequenceMatcher(a=suggested, b=final, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            runs.append(("same", suggested[a0:a1]))
            continue
        if a1 > a0:
            runs.append(("del", suggested[a0:a1]))
        if b1 > b0:
            runs.append(("ins", final[b0:b1]))
    return runs


def create_app(engine: Engine, token: str, data_dir: Path) -> Starlette:
    dashboard = Dashboard(engine, Guard(token), data_dir)
    routes = [
        Route("/login", dashboard.login, methods=["GET", "POST"]),
        Route("/logout", dashboard.logout, methods=["POST"]),
        Route("/", dashboard.overview),
        Route("/completions", dashboard.completions),
        Route("/completions/{completion_id}", dashboard.completion),
        Route("/pairs", dashboard.pairs),
        Route("/runs", dashboard.runs),
        Route("/runs/{run_id:int}", dashboard.run),
        Route("/adapters", dashboard.adapters_page),
        Route("/adapters/{action:str}", dashboard.adapter_action, methods=["POST"]),
        Route("/replays/{name}", dashboard.replay),
        Route("/replays/{name}/report.png", dashboard.replay_chart),
    ]
    middleware = [Middleware(BaseHTTPMiddleware, dispatch=dashboard.check_access)]
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={PageError: dashboard.page_error},
    )


def serve(settings: Any, *, host: str, port: int) -> int:
    """Run the dashboard until interrupted (``ghostloop admin serve``)."""
    import uvicorn

    from feedback.admin_web.auth import TOKEN_FILE, TokenFileError, load_or_create_token
    from feedback.database import open_store, upgrade

    engine = open_store(settings.store)
    upgrade(engine)
    try:
        token, created = load_or_create_token(settings.store.data_dir)
    except TokenFileError as error:
        print(f"ghostloop admin: {error}")
        return 1
    if created:
        print(f"admin token (shown once; kept in {settings.store.data_dir / TOKEN_FILE}): {token}")
    else:
        print(f"admin token: in {settings.store.data_dir / TOKEN_FILE}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}, not only on this machine; use TLS in front of it")
    print(f"dashboard: http://{host}:{port}/ (started {datetime.now(UTC):%H:%M} UTC)", flush=True)
    app = create_app(engine, token, settings.store.data_dir)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
