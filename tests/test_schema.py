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


def test_additions_design_asks_for(conn: psycopg.Connection) -> None:
    """Partial index for open rows, archive backlog, prompt full-text, exact money."""
    defs = " ".join(
        r["indexdef"]
        for r in conn.execute("select indexdef from pg_indexes where tablename = 'generations'")
    )
    assert "generations_open_idx" in defs and "WHERE (status = ANY" in defs
    assert "to_tsvector('english'" in defs
    assert "generations_archive_backlog_idx" in defs
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
