"""Encrypted columns through pgcloak with SQLAlchemy 2 (psycopg 3 driver): Core
statements and the ORM on a model whose email / phone / ssn columns are protected.
The application code is what it would be without pgcloak.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import pytest
import sqlalchemy as sa
from encryption_fixtures import ORDERS, USERS, EncEnv, encryption_env, unique
from sqlalchemy import orm
from sqlalchemy.dialects.postgresql import insert as pg_insert


@pytest.fixture(scope="module")
def env(pg, pg_app_user, tmp_path_factory) -> Iterator[EncEnv]:
    with encryption_env(pg, pg_app_user, tmp_path_factory.mktemp("enc_sqla"), "sqla") as e:
        yield e


@pytest.fixture(scope="module")
def engine(env: EncEnv) -> Iterator[sa.Engine]:
    url = env.proxy_dsn().replace("postgresql://", "postgresql+psycopg://", 1)
    eng = sa.create_engine(url, pool_size=2, max_overflow=0)
    try:
        yield eng
    finally:
        eng.dispose()


metadata = sa.MetaData()
users = sa.Table(
    "users", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("email", sa.Text),
    sa.Column("phone", sa.Text),
    sa.Column("ssn", sa.Text),
    sa.Column("loyalty_id", sa.Text),
    sa.Column("name", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
)
orders = sa.Table(
    "orders", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("buyer_email", sa.Text),
    sa.Column("amount", sa.Integer, nullable=False, server_default="0"),
)


class Base(orm.DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, primary_key=True)
    email: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    phone: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    ssn: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    name: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    created_at: orm.Mapped[datetime] = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now())
    orders: orm.Mapped[list[Order]] = orm.relationship(
        primaryjoin="User.email == foreign(Order.buyer_email)", viewonly=True, order_by="Order.id"
    )


class Order(Base):
    __tablename__ = "orders"
    id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, primary_key=True)
    buyer_email: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    amount: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0")


def test_core_insert_select_update_delete(env: EncEnv, engine: sa.Engine):
    a, b, c = unique("CoreA"), unique("coreb"), unique("corec")
    with engine.begin() as conn:
        row = conn.execute(
            sa.insert(users).values(email=a, phone="+1 202 555 0101", ssn="ssn-a").returning(users.c.id, users.c.email)
        ).one()
        assert row.email == a
        conn.execute(sa.insert(users), [{"email": b, "phone": None, "ssn": "ssn-b"}, {"email": c, "phone": "555", "ssn": None}])
    stored = env.raw_one("SELECT email, phone, ssn FROM users WHERE id = %s", row.id)
    env.assert_stored(stored[0], a)
    env.assert_stored(stored[1], "+1 202 555 0101", USERS, "phone")
    env.assert_stored(stored[2], "ssn-a", USERS, "ssn")
    for email, ssn in ((b, "ssn-b"), (c, None)):
        s = env.stored_users("left(email, 22) = %s", env.index_of(USERS, "email", email), columns="email, ssn")
        env.assert_stored(s[0][0], email)
        env.assert_stored(s[0][1], ssn, USERS, "ssn")
    with engine.connect() as conn:
        got = conn.execute(sa.select(users.c.email, users.c.phone).where(users.c.email == a.lower())).one()
        assert tuple(got) == (a, "+1 202 555 0101")
        got = conn.execute(sa.select(users.c.email).where(users.c.email.in_([a, b, "zz@example.com"])).order_by(users.c.id)).scalars().all()
        assert got == [a, b]
        got = conn.execute(sa.select(users.c.email).where(users.c.email == sa.any_(sa.bindparam("e", [c], type_=sa.ARRAY(sa.Text))))).scalars().all()
        assert got == [c]
        assert conn.execute(sa.select(sa.func.count()).select_from(users).where(users.c.phone.is_(None), users.c.email == b)).scalar() == 1
        u2 = users.alias("u2")
        sub = sa.select(u2.c.id).where(u2.c.email == c).scalar_subquery()
        assert conn.execute(sa.select(users.c.email).where(users.c.id == sub)).scalar() == c
    with engine.begin() as conn:
        result = conn.execute(sa.update(users).where(users.c.email == b).values(email=b + ".new", phone="555-7"))
        assert result.rowcount == 1
        result = conn.execute(sa.delete(users).where(users.c.email == c))
        assert result.rowcount == 1
    s = env.stored_users("left(email, 22) = %s", env.index_of(USERS, "email", b + ".new"), columns="email, phone")
    env.assert_stored(s[0][0], b + ".new")
    env.assert_stored(s[0][1], "555-7", USERS, "phone")
    assert env.raw_one("SELECT count(*) FROM users WHERE left(email, 22) = %s", env.index_of(USERS, "email", c)) == 0


def test_core_upsert_and_unique_violation(env: EncEnv, engine: sa.Engine):
    email = unique("Upsert")
    with engine.begin() as conn:
        conn.execute(sa.insert(users).values(email=email, name="one"))
        stmt = pg_insert(users).values(email=email.upper(), phone="555-3", name="two")
        stmt = stmt.on_conflict_do_update(index_elements=[users.c.email],
                                          set_={"phone": stmt.excluded.phone, "name": stmt.excluded.name})
        conn.execute(stmt)
        stmt = pg_insert(users).values(email=email, name="three").on_conflict_do_nothing(index_elements=["email"])
        conn.execute(stmt)
        got = conn.execute(sa.select(users.c.email, users.c.phone, users.c.name).where(users.c.email == email)).one()
        assert tuple(got) == (email, "555-3", "two")
    with pytest.raises(sa.exc.IntegrityError) as err, engine.begin() as conn:
        conn.execute(sa.insert(users).values(email=" " + email.upper()))
    assert err.value.orig.sqlstate == "23505"


def test_orm_model_round_trip(env: EncEnv, engine: sa.Engine):
    emails = [unique("OrmA"), unique("ormb"), unique("ormc")]
    with orm.Session(engine) as session:
        people = [User(email=e, phone=f"555-02{i}", ssn=f"ssn-{i}", name=f"orm{i}") for i, e in enumerate(emails)]
        session.add_all(people)
        session.flush()
        ids = [p.id for p in people]
        session.add_all([Order(buyer_email=emails[0], amount=7), Order(buyer_email=emails[0].upper(), amount=8)])
        session.commit()
    stored = env.raw("SELECT id, email, phone, ssn FROM users WHERE id = ANY(%s) ORDER BY id", ids)
    for (uid, s_email, s_phone, s_ssn), email, i in zip(stored, emails, range(3), strict=True):
        assert uid == ids[i]
        env.assert_stored(s_email, email)
        env.assert_stored(s_phone, f"555-02{i}", USERS, "phone")
        env.assert_stored(s_ssn, f"ssn-{i}", USERS, "ssn")
    for (s_buyer,) in env.raw("SELECT buyer_email FROM orders WHERE left(buyer_email, 22) = %s",
                              env.index_of(ORDERS, "buyer_email", emails[0])):
        assert s_buyer.startswith(env.index_of(ORDERS, "buyer_email", emails[0]) + ".pgc1:")
    with orm.Session(engine) as session:
        user = session.scalars(sa.select(User).where(User.email == emails[0].upper())).one()
        assert (user.email, user.phone, user.ssn) == (emails[0], "555-020", "ssn-0")
        assert [o.amount for o in user.orders] == [7, 8]
        joined = session.execute(
            sa.select(User.email, Order.amount).join(Order, Order.buyer_email == User.email).where(User.id == ids[0]).order_by(Order.amount)
        ).all()
        assert [tuple(r) for r in joined] == [(emails[0], 7), (emails[0], 8)]
        assert session.get(User, ids[1]).email == emails[1]
        user.phone = "+1 555 0199"
        user.email = emails[0] + ".changed"
        session.delete(session.get(User, ids[2]))
        session.commit()
    stored = env.raw_one("SELECT email, phone FROM users WHERE id = %s", ids[0])
    env.assert_stored(stored[0], emails[0] + ".changed")
    env.assert_stored(stored[1], "+1 555 0199", USERS, "phone")
    assert env.raw_one("SELECT count(*) FROM users WHERE id = %s", ids[2]) == 0
    with orm.Session(engine) as session:
        found = session.scalars(sa.select(User).where(User.email.in_([emails[0] + ".changed", emails[1]])).order_by(User.id)).all()
        assert [u.email for u in found] == [emails[0] + ".changed", emails[1]]
