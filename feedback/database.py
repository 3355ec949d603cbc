"""Opening the store: SQLite (WAL, busy timeout) by default, PostgreSQL for teams, and
bringing its schema up to date with Alembic."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 5000
MIGRATION_LOCK = 0x6768_6F73  # PostgreSQL advisory lock key held while migrating


class StoreError(RuntimeError):
    """The store cannot be opened or migrated; the message says what to check."""


def default_database_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'ghostloop.db'}"


class StoreLocation(Protocol):
    """What locates the store (``ghostloop.settings.StoreSettings``, ``settings.store``)."""

    @property
    def database_url(self) -> str: ...

    @property
    def data_dir(self) -> Path: ...


def store_url(store: StoreLocation) -> str:
    """The configured database URL, or the SQLite file in the data dir."""
    return store.database_url or default_database_url(store.data_dir)


def open_store(store: StoreLocation) -> Engine:
    """The engine of the configured store (``open_engine`` of ``store_url``):
    ``open_store(settings.store)``."""
    return open_engine(store_url(store))


def open_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get WAL, a busy timeout and foreign keys."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(
            f"database URL {url!r} is not a SQLAlchemy URL, e.g. "
            "'postgresql://user@host/db' or 'sqlite:////path/ghostloop.db'"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # a black-holed host must not hang a server start or a poll: give up after 5 s
    return create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 5})


def _sqlite_pragmas(connection: object, _record: object) -> None:
    cursor = connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, "feedback/migrations has no revisions"
    return head


def _unreachable(engine: Engine, error: OperationalError) -> StoreError:
    where = engine.url.render_as_string(hide_password=True)
    return StoreError(
        f"cannot reach the database at {where}: {' '.join(str(error.orig).split())} — "
        "check GHOSTLOOP_DATABASE_URL and that the database server is running"
    )


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except OperationalError as error:
        raise _unreachable(engine, error) from None


def upgrade(engine: Engine) -> str:
    """Apply every migration not yet applied; returns the revision the store is now at."""
    config = _alembic_config()
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                # Several servers may start at once on one database: one migrates, the
                # others wait here and then find nothing left to do.
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}
                )
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except OperationalError as error:
        raise _unreachable(engine, error) from None
    return head_revision()
