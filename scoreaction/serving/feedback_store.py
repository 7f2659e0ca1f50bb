"""Stored human preferences: one row per comparison of two images, in a SQL database (SQLAlchemy Core).

A comparison holds everything needed to see again what the rater saw, and to train on it:

    prompt, negative_prompt
    model_a / model_b            the model ids as requested ('base', 'RUN', 'RUN@step_NNNNNN')
    checkpoint_a / checkpoint_b  the concrete ids they resolved to ('base' or 'RUN@step_NNNNNN')
    seed_a / seed_b              the noise seeds
    height, width, num_inference_steps, guidance_scale, eta
    image_a / image_b            the two PNGs themselves (so a comparison outlives its checkpoints)
    sha256_a / sha256_b          of the PNG bytes
    choice                       'a' | 'b' | 'tie' | 'both_bad'
    rater                        optional rater id
    created_at                   unix seconds (UTC)

The database is a SQLite file by default and PostgreSQL (``postgresql+psycopg://...``) when several replicas
or nodes write. Every ``add`` is its own committed transaction, so a restart loses nothing that was answered.

Schema versioning: the table ``scoreaction_schema`` holds one row per schema name with its version. Opening a
database creates missing tables, records ``SCHEMA_VERSION`` in a new one, applies ``MIGRATIONS`` in order to
an older one, and refuses (``FeedbackStoreError``) one written by newer code.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError

logger = logging.getLogger(__name__)

SCHEMA_NAME = "preferences"
SCHEMA_VERSION = 1
CHOICES = ("a", "b", "tie", "both_bad")
# version v -> function upgrading a connection's schema from v to v + 1 (none yet: version 1 is the first)
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}

metadata = MetaData()
schema_table = Table(
    "scoreaction_schema",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
)
comparisons = Table(
    "preference_comparisons",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", Float, nullable=False),
    Column("prompt", Text, nullable=False),
    Column("negative_prompt", Text, nullable=False, default=""),
    Column("model_a", String(200), nullable=False),
    Column("model_b", String(200), nullable=False),
    Column("checkpoint_a", String(200), nullable=False),
    Column("checkpoint_b", String(200), nullable=False),
    Column("seed_a", BigInteger, nullable=False),
    Column("seed_b", BigInteger, nullable=False),
    Column("height", Integer, nullable=False),
    Column("width", Integer, nullable=False),
    Column("num_inference_steps", Integer, nullable=False),
    Column("guidance_scale", Float, nullable=False),
    Column("eta", Float, nullable=False),
    Column("image_a", LargeBinary, nullable=False),
    Column("image_b", LargeBinary, nullable=False),
    Column("sha256_a", String(64), nullable=False),
    Column("sha256_b", String(64), nullable=False),
    Column("choice", String(16), nullable=False),
    Column("rater", String(100), nullable=True),
)
PARAMS = ("height", "width", "num_inference_steps", "guidance_scale", "eta")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FeedbackStoreError(RuntimeError):
    """The preference database cannot be opened or written (HTTP 503: the service answers, retry later)."""

    status_code = 503
    code = "feedback_store_unavailable"
    param = None


def resolve_database_url(url: str, root: str | os.PathLike | None = None) -> str:
    """A SQLAlchemy URL with a relative SQLite path taken from root (default: the working directory).
    Raises FeedbackStoreError naming the value for a URL SQLAlchemy cannot parse."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise FeedbackStoreError(
            f"feedback.database_url={url!r} is not a database URL: use e.g. sqlite:///outputs/feedback.db or "
            "postgresql+psycopg://user:password@host:5432/dbname"
        ) from exc
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:") and not os.path.isabs(db):
            base = Path(root) if root is not None else Path.cwd()
            parsed = parsed.set(database=str((base / db).resolve()))
    if parsed.drivername == "postgresql":  # SQLAlchemy's default driver is psycopg2; we ship psycopg 3
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def safe_url(url: str) -> str:
    """The URL with its password masked, for logs and errors."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def png_sha256(png: bytes) -> str:
    return hashlib.sha256(png).hexdigest()


class FeedbackStore:
    """The comparisons table of one database. Thread-safe (one pooled engine); each call is a transaction."""

    def __init__(self, url: str, root: str | os.PathLike | None = None) -> None:
        self.url = resolve_database_url(url, root)
        self.engine = _engine(self.url)
        try:
            with self.engine.begin() as conn:
                metadata.create_all(conn, checkfirst=True)
        except IntegrityError:  # another replica created the tables at the same moment
            pass
        except SQLAlchemyError as exc:
            self.engine.dispose()
            raise FeedbackStoreError(
                f"cannot open the preference database {safe_url(self.url)}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0]}"
            ) from exc
        self.version = self._check_schema()

    def _check_schema(self) -> int:
        for _ in range(2):  # a concurrent first open may insert the row between our read and insert
            try:
                with self.engine.begin() as conn:
                    row = conn.execute(
                        select(schema_table.c.version).where(schema_table.c.name == SCHEMA_NAME)
                    ).first()
                    if row is None:
                        conn.execute(insert(schema_table).values(name=SCHEMA_NAME, version=SCHEMA_VERSION))
                        return SCHEMA_VERSION
                    found = int(row[0])
                    if found > SCHEMA_VERSION:
                        raise FeedbackStoreError(
                            f"the preference database {safe_url(self.url)} has schema version {found}; this "
                            f"code reads versions up to {SCHEMA_VERSION}: upgrade scoreaction"
                        )
                    for v in range(found, SCHEMA_VERSION):
                        logger.info("migrating preference schema %d -> %d", v, v + 1)
                        MIGRATIONS[v](conn)
                    if found < SCHEMA_VERSION:
                        conn.execute(
                            update(schema_table)
                            .where(schema_table.c.name == SCHEMA_NAME)
                            .values(version=SCHEMA_VERSION)
                        )
                    return SCHEMA_VERSION
            except IntegrityError:
                continue
        raise FeedbackStoreError(f"cannot record the schema version in {safe_url(self.url)}")

    def close(self) -> None:
        self.engine.dispose()

    # ----------------------------------------------------------------------------------------------
    # Write
    # ----------------------------------------------------------------------------------------------

    def add(
        self,
        *,
        prompt: str,
        model_a: str,
        model_b: str,
        checkpoint_a: str,
        checkpoint_b: str,
        seed_a: int,
        seed_b: int,
        image_a: bytes,
        image_b: bytes,
        choice: str,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        eta: float,
        negative_prompt: str = "",
        rater: str | None = None,
        created_at: float | None = None,
    ) -> int:
        """Store one comparison (committed before this returns); its id."""
        if choice not in CHOICES:
            raise ValueError(f"choice={choice!r} is not allowed; allowed: {', '.join(CHOICES)}")
        for name, png in (("image_a", image_a), ("image_b", image_b)):
            if not isinstance(png, bytes | bytearray) or not bytes(png).startswith(_PNG_MAGIC):
                raise ValueError(f"{name} must be the bytes of a PNG file")
        row = dict(
            created_at=time.time() if created_at is None else float(created_at),
            prompt=prompt,
            negative_prompt=negative_prompt,
            model_a=model_a,
            model_b=model_b,
            checkpoint_a=checkpoint_a,
            checkpoint_b=checkpoint_b,
            seed_a=int(seed_a),
            seed_b=int(seed_b),
            height=int(height),
            width=int(width),
            num_inference_steps=int(num_inference_steps),
            guidance_scale=float(guidance_scale),
            eta=float(eta),
            image_a=bytes(image_a),
            image_b=bytes(image_b),
            sha256_a=png_sha256(bytes(image_a)),
            sha256_b=png_sha256(bytes(image_b)),
            choice=choice,
            rater=rater,
        )
        try:
            with self.engine.begin() as conn:
                result = conn.execute(insert(comparisons).values(**row))
                return int(result.inserted_primary_key[0])
        except SQLAlchemyError as exc:
            raise FeedbackStoreError(
                f"cannot store the comparison in {safe_url(self.url)}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0]}"
            ) from exc

    # ----------------------------------------------------------------------------------------------
    # Read
    # ----------------------------------------------------------------------------------------------

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(comparisons)).scalar_one())

    def page(self, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Up to limit comparisons with id > after, oldest first, as row dicts (images as bytes)."""
        query = select(comparisons).where(comparisons.c.id > after).order_by(comparisons.c.id).limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def get(self, comparison_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(comparisons).where(comparisons.c.id == comparison_id)).first()
        return dict(row._mapping) if row is not None else None

    def iter_all(self, batch: int = 500) -> Iterator[dict[str, Any]]:
        """Every comparison, oldest first, read in pages of batch rows."""
        after = 0
        while rows := self.page(after, batch):
            yield from rows
            after = rows[-1]["id"]


def export_row(row: dict[str, Any], images: bool = False) -> dict[str, Any]:
    """A stored row as the JSON object of GET /v1/preferences (PNGs as base64 when images)."""
    out: dict[str, Any] = {
        "id": row["id"],
        "created_at": row["created_at"],
        "prompt": row["prompt"],
        "negative_prompt": row["negative_prompt"],
        "params": {k: row[k] for k in PARAMS},
        "choice": row["choice"],
        "rater": row["rater"],
    }
    for side in ("a", "b"):
        item = {
            "model": row[f"model_{side}"],
            "checkpoint": row[f"checkpoint_{side}"],
            "seed": row[f"seed_{side}"],
            "sha256": row[f"sha256_{side}"],
        }
        if images:
            item["b64_png"] = base64.b64encode(row[f"image_{side}"]).decode()
        out[side] = item
    return out


def _engine(url: str) -> Engine:
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:"):
            try:
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise FeedbackStoreError(
                    f"cannot create the folder of the preference database {safe_url(url)}: {exc}"
                ) from exc
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    try:
        engine = create_engine(url, **kwargs)
    except (ArgumentError, ImportError) as exc:
        raise FeedbackStoreError(
            f"cannot use the preference database {safe_url(url)}: {type(exc).__name__}: {exc} (PostgreSQL "
            "needs the psycopg package: pip install 'psycopg[binary]'; URL postgresql+psycopg://...)"
        ) from exc
    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # WAL: readers do not block the writer
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

    return engine
