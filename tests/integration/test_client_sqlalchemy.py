"""SQLAlchemy 2 through pgcloak: Core and ORM on psycopg 3, and the asyncpg dialect."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from decimal import Decimal

import psycopg
import pytest
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    create_engine,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from pgcloak.demo.postgres import DbLogin, TemporaryPostgres


def url(proxy, login: DbLogin, driver: str) -> str:
    base = proxy.dsn(login.user, login.password, login.dbname).split("://", 1)[1].split("?", 1)[0]
    query = "?sslmode=disable" if driver == "psycopg" else ""
    return f"postgresql+{driver}://{base}{query}"


@pytest.fixture
def engine(pgcloak, pg_app_user) -> Iterator[Engine]:
    eng = create_engine(url(pgcloak, pg_app_user, "psycopg"), pool_size=2)
    try:
        yield eng
    finally:
        eng.dispose()


def suffix() -> str:
    return uuid.uuid4().hex[:8]


def direct_rows(pg: TemporaryPostgres, login: DbLogin, query: str) -> list[tuple]:
    with psycopg.connect(pg.dsn(login.user, login.password, login.dbname)) as conn:
        return conn.execute(query).fetchall()


def test_core_crud(engine: Engine, pg, pg_app_user):
    metadata = MetaData()
    items = Table(
        f"sa_items_{suffix()}",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", String(50), nullable=False, unique=True),
        Column("price", Numeric(10, 2)),
        Column("blob", LargeBinary),
        Column("attrs", JSON),
        Column("big", BigInteger),
    )
    metadata.create_all(engine)
    try:
        with engine.begin() as conn:
            result = conn.execute(
                insert(items).returning(items.c.id),
                [
                    {
                        "name": f"item-{i}",
                        "price": Decimal(i) + Decimal("0.99"),
                        "blob": bytes([0, i]),
                        "attrs": {"i": i, "ü": [i]},
                        "big": 2**40 + i,
                    }
                    for i in range(20)
                ],
            )
            ids = sorted(r[0] for r in result)
        assert len(ids) == 20
        with engine.connect() as conn:
            row = conn.execute(select(items).where(items.c.name == "item-7")).one()
            assert (row.price, row.blob, row.attrs, row.big) == (
                Decimal("7.99"),
                b"\x00\x07",
                {"i": 7, "ü": [7]},
                2**40 + 7,
            )
            total = conn.execute(select(func.count(), func.sum(items.c.price))).one()
            assert tuple(total) == (20, sum(Decimal(i) + Decimal("0.99") for i in range(20)))
        with engine.begin() as conn:
            updated = conn.execute(
                update(items).where(items.c.id.in_(ids[:5])).values(price=items.c.price * 2)
            )
            assert updated.rowcount == 5
            deleted = conn.execute(delete(items).where(items.c.name.like("item-1_")))
            assert deleted.rowcount == 10
            upsert = (
                pg_insert(items)
                .values(id=ids[0], name="item-0", price=1)
                .on_conflict_do_update(index_elements=[items.c.id], set_={"price": 42})
            )
            conn.execute(upsert)
        with pytest.raises(IntegrityError) as info, engine.begin() as conn:
            conn.execute(insert(items).values(name="item-2", price=0))
        assert info.value.orig.sqlstate == "23505"
        # Checked straight on PostgreSQL.
        assert direct_rows(pg, pg_app_user, f"SELECT count(*), sum(price) FROM {items.name}") == [
            (10, Decimal(42) + sum(Decimal(i) + Decimal("0.99") for i in range(1, 5)) * 2
             + sum(Decimal(i) + Decimal("0.99") for i in range(5, 10))),
        ]  # fmt: skip
    finally:
        metadata.drop_all(engine)


def make_models(tag: str):
    class Base(DeclarativeBase):
        pass

    class Author(Base):
        __tablename__ = f"sa_author_{tag}"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(100))
        created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
        books: Mapped[list[Book]] = relationship(
            back_populates="author", cascade="all, delete-orphan"
        )

    class Book(Base):
        __tablename__ = f"sa_book_{tag}"
        id: Mapped[int] = mapped_column(primary_key=True)
        title: Mapped[str]
        author_id: Mapped[int] = mapped_column(ForeignKey(f"{Author.__tablename__}.id"))
        author: Mapped[Author] = relationship(back_populates="books")

    return Base, Author, Book


def test_orm_session_crud(engine: Engine, pg, pg_app_user):
    Base, Author, Book = make_models(suffix())
    Base.metadata.create_all(engine)
    created = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
    try:
        with Session(engine) as session, session.begin():
            for n in range(3):
                author = Author(name=f"Autör {n} ☃", created=created)
                author.books = [Book(title=f"Book {n}.{k}") for k in range(n + 1)]
                session.add(author)
        with Session(engine) as session:
            authors = session.scalars(select(Author).order_by(Author.id)).all()
            assert [a.name for a in authors] == ["Autör 0 ☃", "Autör 1 ☃", "Autör 2 ☃"]
            assert [[b.title for b in a.books] for a in authors] == [
                ["Book 0.0"], ["Book 1.0", "Book 1.1"], ["Book 2.0", "Book 2.1", "Book 2.2"],
            ]  # fmt: skip
            assert authors[0].created == created
            authors[1].name = "Renamed"
            session.delete(authors[2])  # cascades to its books
            session.commit()
        with Session(engine) as session:
            assert session.scalar(select(func.count()).select_from(Book)) == 3
            assert session.scalars(select(Author.name).order_by(Author.id)).all() == [
                "Autör 0 ☃",
                "Renamed",
            ]
            # A rolled-back unit of work leaves nothing behind.
            session.add(Author(name="ghost", created=created))
            session.flush()
            assert session.scalar(select(func.count()).select_from(Author)) == 3
            session.rollback()
        assert direct_rows(pg, pg_app_user, f"SELECT name FROM {Author.__tablename__} ORDER BY id") == [
            ("Autör 0 ☃",), ("Renamed",),
        ]  # fmt: skip
    finally:
        Base.metadata.drop_all(engine)


async def test_asyncpg_dialect_with_async_engine(pgcloak, pg, pg_app_user):
    pytest.importorskip(
        "greenlet", reason="SQLAlchemy's asyncio extension needs greenlet (SQLAlchemy[asyncio])"
    )
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

    Base, Author, Book = make_models(suffix())
    engine = create_async_engine(url(pgcloak, pg_app_user, "asyncpg"), connect_args={"ssl": False})
    created = dt.datetime(2001, 2, 3, 4, 5, 6, tzinfo=dt.UTC)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        sessions = async_sessionmaker(engine, expire_on_commit=False, class_=AsyncSession)
        async with sessions() as session, session.begin():
            session.add_all(
                [
                    Author(name=f"a{i}", created=created, books=[Book(title=f"t{i}")])
                    for i in range(50)
                ]
            )
        async with sessions() as session:
            count = await session.scalar(select(func.count()).select_from(Book))
            assert count == 50
            first = (await session.scalars(select(Author).where(Author.name == "a7"))).one()
            assert (first.name, first.created) == ("a7", created)
            await session.execute(
                update(Author).where(Author.name.like("a1%")).values(name="changed")
            )
            await session.execute(delete(Book).where(Book.title == "t0"))
            await session.commit()
        async with engine.connect() as conn:
            names = (
                await conn.execute(select(Author.name, func.count()).group_by(Author.name))
            ).all()
            assert dict(names)["changed"] == 11  # a1, a10..a19
            assert (await conn.execute(select(func.count()).select_from(Book))).scalar() == 49
        assert direct_rows(
            pg, pg_app_user, f"SELECT count(*) FROM {Author.__tablename__} WHERE name = 'changed'"
        ) == [(11,)]
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
        await engine.dispose()
