"""The seed article's table is the contract: read it back from the catalog."""

from __future__ import annotations

import psycopg

SEED_COLUMNS = {
    "id": ("bigint", "NO"),
    "request_id": ("text", "NO"),
    "user_id": ("bigint", "NO"),
    "endpoint": ("text", "NO"),
    "inputs": ("jsonb", "NO"),
    "outputs": ("jsonb", "YES"),
    "status": ("USER-DEFINED", "NO"),
    "cost_cents": ("integer", "NO"),
    "error": ("text", "YES"),
    "created_at": ("timestamp with time zone", "NO"),
    "finished_at": ("timestamp with time zone", "YES"),
}

SEED_INDEXES = {
    "generations_request_id_key": "CREATE UNIQUE INDEX generations_request_id_key "
    "ON public.generations USING btree (request_id)",
    "generations_user_created_idx": "CREATE INDEX generations_user_created_idx "
    "ON public.generations USING btree (user_id, created_at DESC)",
    "generations_endpoint_status_idx": "CREATE INDEX generations_endpoint_status_idx "
    "ON public.generations USING btree (endpoint, status)",
    "generations_inputs_gin_idx": "CREATE INDEX generations_inputs_gin_idx "
    "ON public.generations USING gin (inputs)",
}


def test_seed_columns_types_and_nullability(conn: psycopg.Connection) -> None:
    rows = conn.execute(
        "select column_name, data_type, is_nullable, column_default, udt_name "
        "from information_schema.columns where table_name = 'generations'"
    ).fetchall()
    by_name = {r["column_name"]: r for r in rows}
    for column, (data_type, nullable) in SEED_COLUMNS.items():
        assert column in by_name, f"seed column {column} is missing"
        assert (by_name[column]["data_type"], by_name[column]["is_nullable"]) == (
            data_type,
            nullable,
        )
    assert by_name["status"]["udt_name"] == "generation_status"
    assert by_name["status"]["column_default"] == "'submitted'::generation_status"
    assert by_name["cost_cents"]["column_default"] == "0"
    assert by_name["created_at"]["column_default"] == "now()"
    assert by_name["id"]["column_default"].startswith("nextval(")


def test_status_enum_labels_in_order(conn: psycopg.Connection) -> None:
    labels = [
        r["enumlabel"]
        for r in conn.execute(
            "select e.enumlabel from pg_enum e join pg_type t on t.oid = e.enumtypid "
            "where t.typname = 'generation_status' order by e.enumsortorder"
        )
    ]
    assert labels == ["submitted", "in_progress", "completed", "failed", "canceled"]


def test_the_four_seed_indexes_exactly(conn: psycopg.Connection) -> None:
    rows = conn.execute(
        "select indexname, indexdef from pg_indexes where tablename = 'generations'"
    ).fetchall()
    defs = {r["indexname"]: r["indexdef"] for r in rows}
    for name, definition in SEED_INDEXES.items():
        assert defs.get(name) == definition


# index name -> (table, key columns as pg_get_indexdef prints them, predicate or None)
LEDGER_INDEXES = {
    "generations_open_idx": (
        "generations",
        "btree (created_at)",
        "(status = ANY (ARRAY['submitted'::generation_status, 'in_progress'::generation_status]))",
    ),
    "generations_archive_backlog_idx": (
        "generations",
        "btree (finished_at)",
        "((status = 'completed'::generation_status) AND (archive_status = 'pending'::text))",
    ),
    "generations_prompt_fts_idx": (
        "generations",
        "gin (to_tsvector('english'::regconfig, COALESCE((inputs ->> 'prompt'::text), ''::text)))",
        None,
    ),
    "generation_events_dedupe_key": ("generation_events", "btree (dedupe_key)", None),
    "generation_events_request_idx": ("generation_events", "btree (request_id, id)", None),
    "generation_events_waiting_idx": (
        "generation_events",
        "btree (received_at)",
        "(applied_at IS NULL)",
    ),
    "batch_items_pending_idx": ("batch_items", "btree (created_at)", "(state = 'pending'::text)"),
}


def test_each_ledger_index_has_its_own_columns_and_predicate(conn: psycopg.Connection) -> None:
    """Each index compared on its own: table, method and keys, and its WHERE clause."""
    rows = conn.execute(
        "select c.relname as name, t.relname as table_name, i.indisunique as is_unique, "
        "pg_get_indexdef(i.indexrelid) as definition, "
        "pg_get_expr(i.indpred, i.indrelid) as predicate "
        "from pg_index i join pg_class c on c.oid = i.indexrelid "
        "join pg_class t on t.oid = i.indrelid "
        "where c.relname = any(%s)",
        (list(LEDGER_INDEXES),),
    ).fetchall()
    found = {r["name"]: r for r in rows}
    assert set(found) == set(LEDGER_INDEXES)
    for name, (table, keys, predicate) in LEDGER_INDEXES.items():
        row = found[name]
        assert row["table_name"] == table, name
        assert row["predicate"] == predicate, name
        using = row["definition"].split(" USING ", 1)[1].split(" WHERE ", 1)[0]
        assert using == keys, name
    assert found["generation_events_dedupe_key"]["is_unique"]


def test_the_ledger_tables_exist(conn: psycopg.Connection) -> None:
    tables = {
        r["table_name"]
        for r in conn.execute(
            "select table_name from information_schema.tables where table_schema = 'public'"
        )
    }
    assert {
        "prices",
        "generation_events",
        "batches",
        "batch_items",
        "user_budgets",
        "spend_monthly_by_user",
        "spend_monthly_by_endpoint",
        "schema_migrations",
    } <= tables


def test_prompt_search_uses_the_full_text_index(conn: psycopg.Connection) -> None:
    conn.execute("set enable_seqscan = off")
    plan = conn.execute(
        "explain select id from generations where to_tsvector('english', "
        "coalesce(inputs ->> 'prompt', '')) @@ plainto_tsquery('english', 'red fox')"
    ).fetchall()
    assert "generations_prompt_fts_idx" in " ".join(r["QUERY PLAN"] for r in plan)
    conn.rollback()


def test_a_batch_holds_its_default_endpoint_in_one_column(conn: psycopg.Connection) -> None:
    columns = {
        r["column_name"]
        for r in conn.execute(
            "select column_name from information_schema.columns where table_name = 'batches'"
        )
    }
    assert "default_endpoint" in columns
    assert "endpoint" not in columns
