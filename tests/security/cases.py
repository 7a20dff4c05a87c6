r"""The attack table: statements a restricted role might use to get at raw values.

Each Case names what it tries (family and id), the SQL, and what pgwarden must do:

    OK       it runs (and, with oracle=True, answers exactly as over masked data)
    ANY      it may run or be refused; either way nothing raw comes back
    REFUSED  an ErrorResponse (pgwarden's or the database's, e.g. a cast error that
             must then echo a masked value, not a raw one)
    DENIED   pgwarden's own policy refusal: SQLSTATE 42501, message "pgwarden: ..."
    BLOCKED  pgwarden refused it itself, as policy (42501) or as unparseable (42601)

`expect` is for role support (users alice, carol); `analyst` is for role analyst
(hash everything, tables public.*), None when the case is not run as analyst;
`extended` replaces both for the extended protocol (asyncpg), where one Parse holds
one statement and multi-statement strings are refused by the database itself.

oracle=True: support's answer, when pgwarden does not refuse, must equal the answer
of the same SQL run directly on a replica of the shop database holding support's
view of the data (masked email and phone, NULL ticket bodies). That is what shows
LIKE, ranges, ORDER BY, GROUP BY, casts and set operations running on masked values.
Oracle cases therefore must be deterministic (ORDER BY down to id before a LIMIT),
must not use the equality lookup (it finds raw values by design), and stay within
support's cap of 50 rows per statement.

Placeholders <<name>> are raw values of the shop data, filled in at run time from
the database (conftest.shop_values): customer 7 (email, email4 = its first four
characters, email_local, phone, phone7 = its last seven characters, name, street),
customer 12 (email2, phone2), and the card number of customer 8 (pan). Nothing in
the cases may make the database echo such a literal back (the leak check counts a
raw value in any received text, typed by the client or not).
"""

# ruff: noqa: E501 - one case per line reads as a table; the SQL is the point of it

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

OK = "ok"
ANY = "any"
REFUSED = "refused"
DENIED = "refused:42501"
BLOCKED = "refused:pgwarden"
EXPECTATIONS = (OK, ANY, REFUSED, DENIED, BLOCKED)
_PLACEHOLDER = re.compile(r"<<([a-z0-9_]+)>>")


@dataclass(frozen=True)
class Case:
    id: str
    family: str
    sql: str
    expect: str
    analyst: str | None = None
    extended: str | None = None
    oracle: bool = False

    def render(self, values: Mapping[str, str]) -> str:
        """The SQL with its placeholders filled in."""

        def fill(match: re.Match[str]) -> str:
            return values[match.group(1)]

        return _PLACEHOLDER.sub(fill, self.sql)

    def expectation(self, role: str, client: str) -> str | None:
        """What pgwarden must do for role over client's protocol; None: not run."""
        base = self.expect if role == "support" else self.analyst
        if base is None:
            return None
        if client == "asyncpg" and self.extended is not None:
            return self.extended
        return base

    @property
    def param_id(self) -> str:
        return f"{self.family}-{self.id}"


def family(name: str, *rows: tuple[object, ...]) -> list[Case]:
    """Cases of one family from rows (id, sql, expect[, analyst[, extended]][, ORACLE])."""
    cases = []
    for row in rows:
        fields = list(row)
        oracle = fields[-1] == ORACLE
        if oracle:
            fields.pop()
        case_id, sql, expect, *rest = fields
        analyst = rest[0] if rest else None
        extended = rest[1] if len(rest) > 1 else None
        cases.append(
            Case(
                str(case_id),
                name,
                str(sql),
                str(expect),
                None if analyst is None else str(analyst),
                None if extended is None else str(extended),
                oracle,
            )
        )
    return cases


ORACLE = "oracle"  # last element of a row: compare with the masked replica

# fmt: off

SANITY = family(
    "sanity",
    ("select-1", "SELECT 1", OK, OK, ORACLE),
    ("orders", "SELECT id, customer_id, total, created_at FROM orders ORDER BY id LIMIT 5", OK, OK, ORACLE),
    ("customers", "SELECT id, full_name, email, phone FROM customers ORDER BY id LIMIT 5", OK, OK, ORACLE),
    ("tickets-star", "SELECT * FROM support_tickets ORDER BY id LIMIT 5", OK, OK, ORACLE),
    ("email-lookup", "SELECT id, full_name, email, phone FROM customers WHERE email = '<<email>>'", OK, OK),
    ("phone-lookup", "SELECT id, email, phone FROM customers WHERE phone = '<<phone>>'", OK, OK),
    ("count", "SELECT count(*) FROM customers", OK, OK, ORACLE),
    ("lookup-or", "SELECT id FROM customers WHERE email = '<<email>>' OR phone = '<<phone2>>'", OK, OK),
    ("tickets-of-customer", "SELECT ticket_no, subject, status, body FROM support_tickets WHERE customer_id = 7 ORDER BY ticket_no", OK, None, ORACLE),
)

ALIAS = family(
    "alias",
    ("rename-columns", "SELECT c, d FROM customers AS x(a, b, c, d) ORDER BY a LIMIT 5", OK, OK, ORACLE),
    ("rename-fifth-is-street", "SELECT e FROM customers AS x(a, b, c, d, e) ORDER BY a LIMIT 5", DENIED, OK),
    ("rename-qualified", "SELECT x.e FROM customers x(a, b, c, d, e) WHERE x.a = 1", DENIED),
    ("rename-star", "SELECT * FROM customers AS x(a, b, c, d) ORDER BY a LIMIT 3", DENIED, OK),
    ("rename-qualified-star", "SELECT x.* FROM customers x(a, b, c, d) ORDER BY a LIMIT 3", DENIED),
    ("alias-named-street", "SELECT email AS street FROM customers ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("derived-column-named-street", "SELECT street FROM (SELECT id, email AS street FROM customers) s ORDER BY id LIMIT 3", ANY, None, ORACLE),
    ("street-renamed-in-derived", "SELECT s.x FROM (SELECT id, street AS x FROM customers) s ORDER BY id LIMIT 3", DENIED, OK),
    ("street-renamed-email", 'SELECT "email" FROM (SELECT street AS "email" FROM customers) s LIMIT 3', DENIED),
    ("quoted-upper-street", 'SELECT "STREET" FROM customers LIMIT 1', REFUSED),
    ("mixed-case-street", "SELECT StReEt FROM CusTomers LIMIT 1", DENIED, OK),
    ("quoted-street", 'SELECT "street" FROM "customers" LIMIT 1', DENIED),
    ("fully-qualified-street", 'SELECT "public"."customers"."street" FROM public.customers LIMIT 1', DENIED),
    ("mixed-case-masked", 'SELECT Email, PHONE, "full_name" FROM Customers ORDER BY ID LIMIT 3', OK, None, ORACLE),
    ("rename-body", "SELECT e FROM support_tickets AS t(a, b, c, d, e) ORDER BY a LIMIT 3", OK, None, ORACLE),
    ("swap-body-subject", "SELECT subject AS body, body AS subject FROM support_tickets ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("rename-email-short-list", "SELECT p FROM customers AS c(i, n, p) ORDER BY i LIMIT 3", OK, None, ORACLE),
    ("column-alias-shadows-street", "SELECT street FROM customers AS c(street) LIMIT 1", REFUSED),
    ("table-alias-named-street", "SELECT street.email FROM customers AS street ORDER BY street.id LIMIT 3", ANY, None, ORACLE),
    ("table-alias-named-cards", "SELECT pan FROM customers AS payment_cards(pan) ORDER BY 1 LIMIT 3", ANY, None, ORACLE),
)

WHOLE_ROW = family(
    "wholerow",
    ("row-var", "SELECT c FROM customers c ORDER BY id LIMIT 3", DENIED, OK),
    ("row-to-json", "SELECT row_to_json(c) FROM customers c ORDER BY id LIMIT 3", DENIED, OK),
    ("to-json", "SELECT to_json(c) FROM customers c WHERE id = 1", DENIED, OK),
    ("to-jsonb-star", "SELECT to_jsonb(c.*) FROM customers c WHERE id = 1", DENIED),
    ("row-as-text", "SELECT c::text FROM customers c WHERE id = 1", DENIED, OK),
    ("table-name-as-row", "SELECT customers FROM customers WHERE id = 1", DENIED, OK),
    ("row-field-street", "SELECT (c).street FROM customers c WHERE id = 1", DENIED),
    ("row-field-email", "SELECT (c).email FROM customers c WHERE id = 1", ANY, None, ORACLE),
    ("hstore", "SELECT hstore(c) FROM customers c WHERE id = 1", DENIED),
    ("row-constructor-star", "SELECT ROW(c.*)::text FROM customers c WHERE id = 1", DENIED),
    ("scalar-subquery-row", "SELECT (SELECT c FROM customers c WHERE c.id = 1)", DENIED),
    ("derived-row", "SELECT x FROM (SELECT * FROM customers) x LIMIT 1", DENIED, OK),
    ("array-of-rows", "SELECT ARRAY(SELECT c FROM customers c WHERE id <= 2)", DENIED),
    ("ticket-row-json", "SELECT row_to_json(t) FROM support_tickets t ORDER BY id LIMIT 3", ANY, OK),
    ("ticket-row-text", "SELECT t::text FROM support_tickets t WHERE id = 1", ANY),
    ("ticket-json-agg", "SELECT json_agg(t ORDER BY t.id) FROM (SELECT * FROM support_tickets WHERE customer_id = 7) t", ANY, None, ORACLE),
    ("masked-row-text", "SELECT ROW(email, phone)::text FROM customers ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("build-object", "SELECT jsonb_build_object('e', email, 'p', phone) FROM customers ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("orders-row-json", "SELECT to_json(o) FROM orders o ORDER BY id LIMIT 3", OK, OK, ORACLE),
    ("derived-masked-json", "SELECT row_to_json(x) FROM (SELECT id, email, phone FROM customers ORDER BY id LIMIT 3) x", OK, None, ORACLE),
    ("card-row-text", "SELECT p::text FROM payment_cards p LIMIT 1", DENIED, OK),
)

# Packing many rows into one (string_agg, array_agg, json_agg, ARRAY(subquery), ...)
# over protected columns is refused for every role with row limits, however few rows
# it would pack: pgwarden cannot count the rows inside an aggregate (docs/policy.md).
AGGREGATE = family(
    "aggregate",
    ("string-agg-all", "SELECT string_agg(email, ',') FROM customers", DENIED, DENIED),
    ("array-agg-all", "SELECT array_agg(email) FROM customers", DENIED, DENIED),
    ("string-agg-ten", "SELECT string_agg(email, ',' ORDER BY id) FROM (SELECT id, email FROM customers ORDER BY id LIMIT 10) s", DENIED, DENIED),
    ("array-agg-phone", "SELECT array_agg(phone ORDER BY id) FROM customers WHERE id <= 10", DENIED, DENIED),
    ("json-agg-email", "SELECT json_agg(email ORDER BY id) FROM customers WHERE id <= 10", DENIED, DENIED),
    ("string-agg-street", "SELECT string_agg(street, ',') FROM customers WHERE id <= 3", DENIED, DENIED),
    ("array-agg-body", "SELECT array_agg(body) FROM support_tickets WHERE customer_id = 7", DENIED, DENIED),
    ("string-agg-pan", "SELECT string_agg(pan, ',') FROM payment_cards", DENIED, DENIED),
    ("min-max-email", "SELECT min(email), max(email) FROM customers", ANY, OK, ORACLE),
    ("min-street", "SELECT min(street) FROM customers", DENIED, OK),
    ("max-pan", "SELECT max(pan) FROM payment_cards", DENIED, OK),
    ("count-distinct-email", "SELECT count(DISTINCT email) FROM customers", ANY, OK, ORACLE),
    ("group-count-email", "SELECT email, count(*) FROM customers GROUP BY email ORDER BY count(*) DESC, email LIMIT 10", OK, None, ORACLE),
    ("first-value", "SELECT id, first_value(email) OVER (ORDER BY id) FROM customers WHERE id <= 5", OK, None, ORACLE),
    ("lag-phone", "SELECT id, lag(phone) OVER (ORDER BY id) FROM customers WHERE id <= 5", OK, None, ORACLE),
    ("lead-street", "SELECT id, lead(street) OVER (ORDER BY id) FROM customers WHERE id <= 5", DENIED, OK),
    ("window-string-agg", "SELECT id, string_agg(email, ',') OVER (ORDER BY id) FROM customers WHERE id <= 5", DENIED, DENIED),
    ("nth-value-body", "SELECT id, nth_value(body, 1) OVER (ORDER BY id) FROM support_tickets WHERE customer_id = 7", OK, None, ORACLE),
    ("partition-by-street", "SELECT id, row_number() OVER (PARTITION BY street ORDER BY id) FROM customers LIMIT 5", DENIED),
    ("distinct-first-value", "SELECT DISTINCT first_value(email) OVER (ORDER BY email DESC, id) FROM customers", ANY, None, ORACLE),
    ("mode-email", "SELECT mode() WITHIN GROUP (ORDER BY email) FROM customers", ANY, None, ORACLE),
    ("percentile-phone", "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY phone) FROM customers", ANY, None, ORACLE),
    ("xmlagg", "SELECT xmlagg(xmlelement(name e, email) ORDER BY id)::text FROM customers WHERE id <= 5", ANY, None, ORACLE),
    ("jsonb-object-agg", "SELECT jsonb_object_agg(id, email) FROM customers WHERE id <= 5", ANY, None, ORACLE),
    ("bit-or-street", "SELECT bit_or(length(street)) FROM customers", DENIED),
    ("distinct-initials", "SELECT string_agg(DISTINCT left(email, 1), '' ORDER BY left(email, 1)) FROM customers", ANY, None, ORACLE),
)

SET_OPERATION = family(
    "setop",
    ("union-cards", "SELECT email FROM customers WHERE id = 1 UNION SELECT pan FROM payment_cards", DENIED, OK),
    ("union-all-street", "SELECT full_name FROM customers WHERE id <= 3 UNION ALL SELECT street FROM customers WHERE id <= 3", DENIED, OK),
    ("union-all-cards-pairs", "SELECT id, email FROM customers WHERE id <= 3 UNION ALL SELECT customer_id, pan FROM payment_cards WHERE customer_id <= 4", DENIED, OK),
    ("except-cards", "SELECT email FROM customers WHERE id = 1 EXCEPT SELECT expiry FROM payment_cards", DENIED, OK),
    ("intersect-all-street", "SELECT street FROM customers INTERSECT ALL SELECT street FROM customers", DENIED),
    ("union-street-false", "SELECT street FROM customers WHERE false UNION SELECT 'x'", DENIED),
    ("intersect-masked", "SELECT email FROM customers WHERE id <= 3 INTERSECT SELECT email FROM customers WHERE id <= 5", OK, None, ORACLE),
    ("except-masked", "SELECT phone FROM customers WHERE id <= 5 EXCEPT SELECT phone FROM customers WHERE id <= 2", OK, None, ORACLE),
    ("union-body-subject", "SELECT body FROM support_tickets WHERE id <= 3 UNION SELECT subject FROM support_tickets WHERE id <= 3", OK, None, ORACLE),
    ("intersect-guess-email", "SELECT count(*) FROM (SELECT '<<email>>' INTERSECT SELECT email FROM customers) s", OK, OK, ORACLE),
    ("intersect-guess-phone", "SELECT EXISTS (SELECT '<<phone>>' INTERSECT SELECT phone FROM customers)", OK, OK, ORACLE),
    ("intersect-guess-pan", "SELECT 1 WHERE EXISTS (SELECT pan FROM payment_cards INTERSECT SELECT '<<pan>>')", DENIED, OK),
    ("parenthesized-limits", "(SELECT email FROM customers ORDER BY id LIMIT 2) UNION (SELECT phone FROM customers ORDER BY id LIMIT 2)", OK, None, ORACLE),
    ("values-union", "VALUES ('a') UNION SELECT email FROM customers WHERE id = 2", OK, None, ORACLE),
    ("union-type-error", "SELECT 1 UNION SELECT email FROM customers WHERE id = 1", REFUSED, None, ORACLE),
)

CTE_SUBQUERY = family(
    "cte",
    ("cte-shadows-customers", "WITH customers AS (SELECT * FROM public.customers) SELECT street FROM customers LIMIT 1", DENIED, ANY),
    ("cte-star-unused-street", "WITH c AS (SELECT * FROM customers) SELECT email FROM c ORDER BY id LIMIT 3", DENIED, OK),
    ("cte-masked", "WITH c AS (SELECT id, email FROM customers) SELECT email FROM c ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("cte-named-payment-cards", "WITH payment_cards AS (SELECT id, total AS pan FROM orders) SELECT id, pan FROM payment_cards ORDER BY id LIMIT 3", ANY, None, ORACLE),
    ("cte-named-customers-benign", "WITH customers AS (SELECT 1 AS id, 'x' AS street) SELECT street FROM customers", ANY, None, ORACLE),
    ("cte-named-orders-street", "WITH orders AS (SELECT id, street AS total FROM customers) SELECT total FROM orders LIMIT 1", DENIED, ANY),
    ("recursive-street", "WITH RECURSIVE r(n, e) AS (SELECT 1, (SELECT street FROM customers WHERE id = 1) UNION ALL SELECT n + 1, e FROM r WHERE n < 3) SELECT * FROM r", DENIED, OK),
    ("recursive-masked", "WITH RECURSIVE r(i, e) AS (SELECT 1, email FROM customers WHERE id = 1 UNION ALL SELECT i + 1, e || '.' FROM r WHERE i < 3) SELECT * FROM r", OK, None, ORACLE),
    ("recursive-char-walk", "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < 20) SELECT i, substr((SELECT email FROM customers WHERE id = 1), i, 1) FROM r", OK, None, ORACLE),
    ("scalar-pan", "SELECT id, (SELECT pan FROM payment_cards p WHERE p.customer_id = c.id) FROM customers c WHERE id <= 4", DENIED, OK),
    ("scalar-street", "SELECT (SELECT street FROM customers WHERE id = 1)", DENIED, OK),
    ("scalar-body", "SELECT (SELECT body FROM support_tickets WHERE id = 1) AS b", OK, None, ORACLE),
    ("exists-pan-prefix", "SELECT id FROM customers c WHERE EXISTS (SELECT 1 FROM payment_cards p WHERE p.customer_id = c.id AND p.pan LIKE '4%') ORDER BY id LIMIT 3", DENIED, OK),
    ("exists-street", "SELECT id FROM customers WHERE EXISTS (SELECT 1 WHERE street LIKE '1%') LIMIT 3", DENIED),
    ("exists-lookup", "SELECT EXISTS (SELECT 1 FROM customers WHERE email = '<<email>>')", OK, OK),
    ("correlated-street", "SELECT a.id FROM customers a WHERE a.street = (SELECT b.street FROM customers b WHERE b.id = 1)", DENIED),
    ("lateral-street", "SELECT c.id, l.x FROM customers c, LATERAL (SELECT c.street AS x) l LIMIT 3", DENIED, OK),
    ("lateral-masked", "SELECT c.id, l.e FROM customers c CROSS JOIN LATERAL (SELECT c.email AS e) l ORDER BY c.id LIMIT 3", OK, None, ORACLE),
    ("lateral-count", "SELECT c.id, t.n FROM customers c JOIN LATERAL (SELECT count(*) AS n FROM support_tickets t WHERE t.customer_id = c.id) t ON true ORDER BY c.id LIMIT 5", OK, None, ORACLE),
    ("in-cards", "SELECT id FROM customers WHERE id IN (SELECT customer_id FROM payment_cards) ORDER BY id LIMIT 3", DENIED, OK),
    ("nested-star", "SELECT * FROM (SELECT * FROM (SELECT * FROM customers) a) b LIMIT 1", DENIED, OK),
    ("materialized-body", "WITH t AS MATERIALIZED (SELECT id, body FROM support_tickets WHERE id <= 3) SELECT * FROM t", OK, None, ORACLE),
    ("cte-delete", "WITH x AS (DELETE FROM orders WHERE id = -1 RETURNING *) SELECT * FROM x", DENIED, DENIED),
    ("cte-insert", "WITH x AS (INSERT INTO orders (id, customer_id, total, created_at) VALUES (1, 1, 1, now()) RETURNING id) SELECT * FROM x", DENIED, DENIED),
)

CAST_ERROR = family(
    "cast",
    ("email-int", "SELECT email::int FROM customers WHERE id = 1", REFUSED, REFUSED, ORACLE),
    ("phone-date", "SELECT phone::date FROM customers WHERE id = 1", REFUSED, REFUSED, ORACLE),
    ("email-json", "SELECT email::json FROM customers WHERE id = 1", REFUSED, None, ORACLE),
    ("email-jsonb-array", "SELECT ('[' || email || ']')::jsonb FROM customers WHERE id = 1", REFUSED, None, ORACLE),
    ("phone-numeric", "SELECT phone::numeric FROM customers WHERE id = 1", REFUSED, None, ORACLE),
    ("phone-boolean", "SELECT phone::boolean FROM customers WHERE id = 1", REFUSED, None, ORACLE),
    ("email-uuid", "SELECT email::uuid FROM customers WHERE id = 1", REFUSED, None, ORACLE),
    ("email-interval", "SELECT email::interval FROM customers WHERE id = 1", REFUSED, None, ORACLE),
    ("email-regclass", "SELECT email::regclass FROM customers WHERE id = 1", REFUSED, None, ORACLE),
    ("name-and-email-int", "SELECT CAST(full_name || email AS integer) FROM customers WHERE id = 1", REFUSED, REFUSED, ORACLE),
    ("scalar-subquery-int", "SELECT (SELECT email FROM customers WHERE id = 1)::int", REFUSED, REFUSED, ORACLE),
    ("lookup-then-cast", "SELECT email::int FROM customers WHERE email = '<<email>>'", REFUSED, OK),
    ("to-number", "SELECT to_number(email, '9999') FROM customers WHERE id = 1", ANY, None, ORACLE),
    ("to-date", "SELECT to_date(email, 'YYYY') FROM customers WHERE id = 1", ANY, None, ORACLE),
    ("xmlparse", "SELECT xmlparse(document email) FROM customers WHERE id = 1", ANY, None, ORACLE),
    ("input-error-info-email", "SELECT message FROM pg_input_error_info((SELECT email FROM customers WHERE id = 1), 'integer')", ANY, None, ORACLE),
    ("input-error-info-street", "SELECT pg_input_error_info(street, 'integer') FROM customers LIMIT 1", DENIED, ANY),
    ("street-int", "SELECT street::int FROM customers WHERE id = 1", DENIED, REFUSED),
    ("street-int-in-where", "SELECT id FROM customers WHERE street::int > 0", DENIED),
    ("body-int", "SELECT body::int FROM support_tickets WHERE id = 1", OK, REFUSED, ORACLE),
    ("body-int-not-null", "SELECT body::int FROM support_tickets WHERE body IS NOT NULL LIMIT 1", OK, None, ORACLE),
    ("pan-bigint", "SELECT pan::bigint FROM payment_cards LIMIT 1", DENIED, REFUSED),
    ("pan-int-overflow", "SELECT pan::int FROM payment_cards WHERE customer_id = 8", DENIED, REFUSED),
    ("divide-by-street", "SELECT 1 / (CASE WHEN street LIKE '1%' THEN 0 ELSE 1 END) FROM customers", DENIED),
    ("divide-by-length", "SELECT 1 / (length(email) - 16) FROM customers WHERE id = 1", ANY, None, ORACLE),
    ("case-divide", "SELECT CASE WHEN email LIKE '<<email4>>%' THEN 1 / 0 ELSE 0 END FROM customers WHERE id = 7", ANY, None, ORACLE),
)

DYNAMIC = family(
    "dynamic",
    ("query-to-xml", "SELECT query_to_xml('SELECT street FROM customers', true, false, '')", DENIED, DENIED),
    ("query-to-xml-cards", "SELECT query_to_xml('SELECT pan FROM payment_cards', true, false, '')", DENIED),
    ("query-to-xml-and-schema", "SELECT query_to_xml_and_xmlschema('SELECT street FROM customers', true, false, '')", DENIED),
    ("table-to-xml", "SELECT table_to_xml('customers', true, false, '')", DENIED, DENIED),
    ("schema-to-xml", "SELECT schema_to_xml('public', true, false, '')", DENIED),
    ("database-to-xml", "SELECT database_to_xml(true, false, '')", DENIED),
    ("xpath-over-query", "SELECT xpath('//pan/text()', query_to_xml('SELECT pan FROM payment_cards', true, false, ''))", DENIED),
    ("dblink", "SELECT * FROM dblink('dbname=shop', 'SELECT street FROM customers') AS t(s text)", DENIED, DENIED),
    ("dblink-connect", "SELECT dblink_connect('x', 'dbname=shop')", DENIED),
    ("do-notice", "DO $$ BEGIN RAISE NOTICE '%', (SELECT street FROM customers LIMIT 1); END $$", DENIED, DENIED),
    ("do-exception", "DO $$ BEGIN RAISE EXCEPTION '%', (SELECT email FROM customers LIMIT 1); END $$", DENIED),
    ("do-empty", "DO $$ BEGIN END $$", DENIED),
    ("do-language", "DO LANGUAGE plpgsql $x$ BEGIN PERFORM pg_sleep(0); END $x$", DENIED),
    ("prepare-execute", "PREPARE p AS SELECT street FROM customers; EXECUTE p", DENIED, DENIED, REFUSED),
    ("prepare", "PREPARE p2 AS SELECT 1", DENIED, DENIED),
    ("execute", "EXECUTE p_none", DENIED),
    ("copy-table-stdout", "COPY customers TO STDOUT", DENIED, DENIED),
    ("copy-query-stdout", "COPY (SELECT street FROM customers) TO STDOUT", DENIED),
    ("copy-masked-stdout", "COPY (SELECT email FROM customers ORDER BY id LIMIT 3) TO STDOUT", DENIED, DENIED),
    ("copy-cards-binary", "COPY payment_cards TO STDOUT (FORMAT binary)", DENIED, DENIED),
    ("copy-to-file", "COPY customers TO '/tmp/pgwarden-security-customers.csv'", DENIED),
    ("copy-from-program", "COPY orders FROM PROGRAM 'true'", DENIED),
    ("copy-to-program", "COPY (SELECT 1) TO PROGRAM 'cat > /dev/null'", DENIED),
    ("copy-from-stdin", "COPY orders FROM STDIN", DENIED),
    ("read-file", "SELECT pg_read_file('/etc/passwd')", DENIED, DENIED),
    ("read-binary-file", "SELECT pg_read_binary_file('postgresql.conf')", DENIED),
    ("read-file-qualified", "SELECT pg_catalog.pg_read_file('/etc/hostname')", DENIED),
    ("read-file-quoted", 'SELECT "pg_read_file"(\'/etc/hostname\')', DENIED),
    ("read-file-upper", "SELECT PG_READ_FILE('/etc/hostname')", DENIED),
    ("read-file-from-settings", "SELECT pg_read_file(setting) FROM pg_settings WHERE name = 'hba_file'", DENIED),
    ("ls-dir", "SELECT pg_ls_dir('.')", DENIED),
    ("stat-file", "SELECT pg_stat_file('postgresql.conf')", DENIED),
    ("lo-import", "SELECT lo_import('/etc/passwd')", DENIED, DENIED),
    ("lo-get", "SELECT lo_get(1)", DENIED),
    ("lo-export", "SELECT lo_export(1, '/tmp/pgwarden-security-lo')", DENIED),
    ("lo-read", "SELECT loread(lo_open(1, 262144), 10)", DENIED),
    ("lo-from-bytea", "SELECT lo_from_bytea(0, convert_to((SELECT email FROM customers WHERE id = 1), 'UTF8'))", DENIED),
    ("set-config-role", "SELECT set_config('role', 'postgres', false)", DENIED, DENIED),
    ("sleep", "SELECT pg_sleep(0.01)", DENIED, DENIED),
    ("sleep-for", "SELECT pg_sleep_for('1 millisecond')", DENIED),
    ("sleep-timing-oracle", "SELECT id FROM customers WHERE email LIKE 'h%' AND pg_sleep(0.01) IS NOT NULL LIMIT 1", DENIED),
    ("terminate-backend", "SELECT pg_terminate_backend(0)", DENIED),
    ("reload-conf", "SELECT pg_reload_conf()", DENIED),
    ("ts-stat-street", "SELECT * FROM ts_stat('SELECT to_tsvector(street) FROM customers')", DENIED, DENIED),
    ("ts-stat-body", "SELECT word FROM ts_stat('SELECT to_tsvector(body) FROM support_tickets') LIMIT 5", DENIED),
    ("unknown-function", "SELECT sec_no_such_function(1)", BLOCKED, BLOCKED),
    ("call", "CALL sec_no_such_procedure()", DENIED),
    ("listen", "LISTEN sec_channel", DENIED),
    ("notify", "NOTIFY sec_channel, 'x'", DENIED),
    ("load", "LOAD 'plpgsql'", DENIED),
    ("current-setting", "SELECT current_setting('server_version')", ANY, ANY),
    ("current-setting-data-directory", "SELECT current_setting('data_directory')", ANY),
    ("current-query", "SELECT current_query()", ANY, ANY),
    ("pg-notify-masked", "SELECT pg_notify('sec_channel', (SELECT email FROM customers WHERE id = 1))", ANY),
)

CATALOG = family(
    "catalog",
    ("pg-stats-mcv", "SELECT most_common_vals::text FROM pg_stats WHERE tablename = 'customers'", DENIED, DENIED),
    ("pg-stats-histogram", "SELECT histogram_bounds::text FROM pg_catalog.pg_stats WHERE attname = 'email'", DENIED, DENIED),
    ("pg-stats-quoted", 'SELECT * FROM "pg_stats" LIMIT 1', DENIED),
    ("pg-stats-upper", "SELECT * FROM PG_CATALOG.PG_STATS LIMIT 1", DENIED),
    ("pg-stats-join", "SELECT s.most_common_vals::text FROM pg_class c JOIN pg_stats s ON s.tablename = c.relname WHERE c.relname = 'customers'", DENIED),
    ("pg-stats-scalar", "SELECT (SELECT most_common_vals::text FROM pg_stats WHERE attname = 'street' LIMIT 1)", DENIED),
    ("pg-statistic", "SELECT stavalues1::text FROM pg_statistic LIMIT 5", DENIED, DENIED),
    ("pg-stats-ext", "SELECT * FROM pg_stats_ext", DENIED),
    ("pg-stats-ext-exprs", "SELECT * FROM pg_stats_ext_exprs", DENIED),
    ("pg-statistic-ext-data", "SELECT * FROM pg_statistic_ext_data", DENIED),
    ("stat-activity", "SELECT query FROM pg_stat_activity", DENIED, DENIED),
    ("stat-activity-qualified", "SELECT query FROM pg_catalog.pg_stat_activity WHERE pid <> pg_backend_pid()", DENIED),
    ("stat-get-activity", "SELECT * FROM pg_stat_get_activity(NULL)", DENIED),
    ("stat-get-backend-activity", "SELECT pg_stat_get_backend_activity(1)", DENIED),
    ("stat-statements", "SELECT query FROM pg_stat_statements", DENIED, DENIED),
    ("pg-shadow", "SELECT usename, passwd FROM pg_shadow", DENIED, DENIED),
    ("pg-authid", "SELECT rolname, rolpassword FROM pg_authid", DENIED, DENIED),
    ("pg-largeobject", "SELECT data FROM pg_largeobject", DENIED, DENIED),
    ("pg-user-mappings", "SELECT * FROM pg_user_mappings", DENIED),
    ("hba-file-rules", "SELECT * FROM pg_hba_file_rules", REFUSED),
    ("pg-class", "SELECT relname, relkind FROM pg_class WHERE relname = 'customers'", OK, OK),
    ("pg-attribute", "SELECT attname FROM pg_attribute WHERE attrelid = 'public.customers'::regclass AND attnum > 0 ORDER BY attnum", OK, OK),
    ("information-schema-columns", "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'customers' ORDER BY ordinal_position", OK, OK),
    ("information-schema-tables", "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1", OK),
    ("pg-namespace", "SELECT nspname FROM pg_namespace ORDER BY 1", OK),
    ("stat-user-tables", "SELECT relname, n_live_tup FROM pg_stat_user_tables", ANY),
    ("prepared-statements", "SELECT * FROM pg_prepared_statements", ANY),
    ("settings-data-directory", "SELECT setting FROM pg_settings WHERE name = 'data_directory'", ANY),
)

SHADOWING = family(
    "shadow",
    ("set-search-path", "SET search_path = pg_temp, public", DENIED, DENIED),
    ("set-search-path-to", "SET search_path TO sec_fixture, public", DENIED),
    ("set-search-path-default-value", 'SET search_path = "$user", public', DENIED),
    ("set-session-search-path", "SET SESSION search_path = public", DENIED),
    ("set-local-search-path", "SET LOCAL search_path = pg_temp", DENIED),
    ("set-quoted-search-path", 'SET "search_path" = public', DENIED),
    ("set-upper-search-path", "SET SEARCH_PATH = public", DENIED),
    ("set-config-search-path", "SELECT set_config('search_path', 'pg_temp, public', false)", DENIED, DENIED),
    ("set-config-qualified", "SELECT pg_catalog.set_config('search_path', 'sec_fixture', false)", DENIED),
    ("reset-search-path", "RESET search_path", ANY),
    ("create-temp-table", "CREATE TEMP TABLE customers (id int, full_name text, email text, phone text, street text)", DENIED, DENIED),
    ("create-temp-view", "CREATE TEMPORARY VIEW v AS SELECT street FROM customers", DENIED),
    ("pg-temp-customers", "SELECT * FROM pg_temp.customers", BLOCKED, BLOCKED),
    ("pg-temp-email", "SELECT email FROM pg_temp.customers", BLOCKED),
    ("public-cards", "SELECT * FROM public.payment_cards LIMIT 1", DENIED, OK),
    ("public-masked", 'SELECT email FROM "public"."customers" ORDER BY id LIMIT 3', OK, None, ORACLE),
    ("other-schema-same-name", "SELECT email FROM sec_fixture.customers ORDER BY id LIMIT 3", DENIED, DENIED),
    ("other-schema-street", "SELECT email, street FROM sec_fixture.customers LIMIT 1", DENIED),
)

UNICODE_ESCAPES = family(
    "unicode",
    ("u-ident-email", r'SELECT U&"e\006dail" FROM customers ORDER BY id LIMIT 3', ANY, None, ORACLE),
    ("u-ident-email-in-where", r"""SELECT id FROM customers WHERE U&"e\006dail" LIKE 'h%' ORDER BY id LIMIT 5""", ANY, None, ORACLE),
    ("u-ident-street", r'SELECT U&"\0073treet" FROM customers LIMIT 1', BLOCKED, ANY),
    ("u-ident-uescape", r"""SELECT U&"!0073treet" UESCAPE '!' FROM customers LIMIT 1""", BLOCKED),
    ("u-ident-table", r'SELECT * FROM U&"payment\005fcards" LIMIT 1', BLOCKED, ANY),
    ("u-ident-function", r"""SELECT U&"pg_read\005ffile"('/etc/hostname')""", BLOCKED),
    ("u-string-search-path", r"SET search_path = U&'pg\005ftemp'", BLOCKED),
    ("u-string-lookup", "SELECT id FROM customers WHERE email = U&'<<email>>'", ANY),
    ("homoglyph-street", "SELECT \"\u0455treet\" FROM customers LIMIT 1", REFUSED),
    ("dollar-concat-street", "SELECT $$x$$ || street FROM customers LIMIT 1", DENIED),
    ("dollar-tag-quote", "SELECT $_$'$_$, street FROM customers LIMIT 1", DENIED),
    ("dollar-hides-statement", "SELECT $a$ $$ ; SELECT street FROM customers; $$ $a$", ANY, None, ORACLE),
    ("dollar-plain-hides", "SELECT $$; SELECT street FROM customers; $$", ANY, None, ORACLE),
    ("dollar-function-name", "SELECT $q$pg_read_file$q$", ANY, None, ORACLE),
    ("e-string-escaped-quote", r"SELECT E'a\'; SELECT street FROM customers LIMIT 1; --'", ANY, None, ORACLE),
    ("standard-string-backslash", r"SELECT 'a\'; SELECT street FROM customers LIMIT 1; --'", BLOCKED, None, REFUSED),
    ("e-string-hex", r"SELECT E'\x73treet'", ANY, None, ORACLE),
    ("e-string-unicode-like", r"SELECT id, email FROM customers WHERE email LIKE E'\u0068%' ORDER BY id LIMIT 5", OK, None, ORACLE),
    ("quoted-ident-with-quote", 'SELECT 1 AS "a""b", street FROM customers LIMIT 1', DENIED),
)

COMMENT_WHITESPACE = family(
    "comment",
    ("inline-comments", "SELECT/**/street/**/FROM/**/customers LIMIT 1", DENIED, OK),
    ("tabs-newlines", "SELECT\tstreet\nFROM\r\ncustomers LIMIT 1", DENIED),
    ("line-comment-inside", "SELECT street--x\nFROM customers LIMIT 1", DENIED),
    ("leading-line-comment", "-- hello\nSELECT street FROM customers LIMIT 1", DENIED),
    ("leading-block-comment", "/* hello */ SELECT * FROM payment_cards LIMIT 1", DENIED, OK),
    ("masked-with-comments", "SELECT email/**/FROM/**/customers ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("trailing-comment-statement", "SELECT email FROM customers -- ; SELECT street FROM customers\nORDER BY id LIMIT 3", OK, None, ORACLE),
    ("comment-ends-at-newline", "SELECT 1 --\n; SELECT street FROM customers LIMIT 1", DENIED, None, REFUSED),
    ("block-comment-semicolon", "SELECT 1 /* ; */ ; SELECT street FROM customers LIMIT 1", DENIED, None, REFUSED),
    ("nested-comment-hides", "SELECT 1 /* nested /* comment */ ; SELECT street FROM customers; */", ANY, None, ORACLE),
    ("nested-comment-smuggles-street", "SELECT /* /* */ ' */ street FROM customers LIMIT 1 -- '", BLOCKED, ANY),
    ("nested-comment-unterminated", "SELECT 1 /* /* */ ; SELECT street FROM customers", REFUSED),
    ("unterminated-comment", "SELECT street FROM customers WHERE id = 1 /* unterminated", REFUSED),
    ("comment-splits-keyword", "SEL/**/ECT street FROM customers", REFUSED),
    ("trailing-semicolons", "SELECT street FROM customers LIMIT 1;;;", DENIED),
    ("leading-semicolon", " ; SELECT street FROM customers LIMIT 1", DENIED),
    ("form-feed", "SELECT\fstreet FROM customers LIMIT 1", BLOCKED),
    ("vertical-tab", "SELECT\vstreet FROM customers LIMIT 1", REFUSED),
    ("no-break-space", "SELECT\u00a0street FROM customers LIMIT 1", REFUSED),
    ("long-whitespace", "SELECT" + " " * 10_000 + "street FROM customers LIMIT 1", DENIED),
)

MULTI_STATEMENT = family(
    "multi",
    ("select-then-street", "SELECT 1; SELECT street FROM customers LIMIT 1", DENIED, OK, REFUSED),
    ("select-then-cards", "SELECT 1; SELECT pan FROM payment_cards LIMIT 1", DENIED, OK, REFUSED),
    ("cards-then-select", "SELECT * FROM payment_cards LIMIT 1; SELECT 1", DENIED, OK, REFUSED),
    ("masked-then-star", "SELECT email FROM customers WHERE id = 1; SELECT * FROM customers LIMIT 1", DENIED, OK, REFUSED),
    ("begin-street-commit", "BEGIN; SELECT street FROM customers LIMIT 1; COMMIT", DENIED, None, REFUSED),
    ("search-path-then-read", "SELECT 1; SET search_path = pg_temp; SELECT email FROM customers LIMIT 1", DENIED, DENIED, REFUSED),
    ("set-then-cards", "SET application_name = 'x'; SELECT * FROM payment_cards LIMIT 1", DENIED, None, REFUSED),
    ("then-copy", "SELECT 1; COPY customers TO STDOUT", DENIED, DENIED, REFUSED),
    ("then-do", "SELECT 1; DO $$ BEGIN PERFORM 1; END $$", DENIED, None, REFUSED),
    ("then-prepare", "SELECT 1; PREPARE x AS SELECT street FROM customers", DENIED, None, REFUSED),
    ("semicolon-in-string", "SELECT ';'; SELECT street FROM customers LIMIT 1", DENIED, None, REFUSED),
    ("semicolon-in-dollar", "SELECT $$;$$; SELECT street FROM customers LIMIT 1", DENIED, None, REFUSED),
    ("rollback-then-read", "BEGIN; SELECT 1; ROLLBACK; SELECT street FROM customers LIMIT 1", DENIED, None, REFUSED),
    ("error-then-read", "SELECT 1/0; SELECT street FROM customers LIMIT 1", DENIED, None, REFUSED),
    ("cursor-street", "BEGIN; DECLARE c CURSOR FOR SELECT street FROM customers; FETCH 1 FROM c; COMMIT", DENIED, None, REFUSED),
    ("cursor-cards", "BEGIN; DECLARE c CURSOR FOR SELECT * FROM payment_cards; FETCH ALL FROM c; COMMIT", DENIED, OK, REFUSED),
    ("cursor-with-hold-star", "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM customers; FETCH 1 FROM c; CLOSE c", DENIED, None, REFUSED),
    ("two-selects", "SELECT 1; SELECT 2", OK, OK, REFUSED, ORACLE),
    ("two-masked", "SELECT email FROM customers WHERE id = 1; SELECT email FROM customers WHERE id = 2", OK, None, REFUSED, ORACLE),
    ("cursor-masked", "BEGIN; DECLARE c CURSOR FOR SELECT id, email FROM customers ORDER BY id; FETCH 3 FROM c; CLOSE c; COMMIT", OK, OK, REFUSED, ORACLE),
    ("savepoint-masked", "BEGIN; SAVEPOINT s; SELECT email FROM customers WHERE id = 3; RELEASE SAVEPOINT s; COMMIT", OK, None, REFUSED, ORACLE),
)

MASKED_ORACLE = family(
    "oracle",
    ("like-prefix", "SELECT id FROM customers WHERE email LIKE '<<email4>>%' ORDER BY id", OK, OK, ORACLE),
    ("like-first-letter", "SELECT id, email FROM customers WHERE email LIKE 'h%' ORDER BY id LIMIT 20", OK, None, ORACLE),
    ("like-dot-in-local", "SELECT count(*) FROM customers WHERE email LIKE '%.%@%'", OK, OK, ORACLE),
    ("like-digit-before-at", "SELECT count(*) FROM customers WHERE email LIKE '%' || '1' || '@%'", OK, None, ORACLE),
    ("like-whole-value", "SELECT id FROM customers WHERE email LIKE '<<email>>'", OK, OK, ORACLE),
    ("ilike-local-part", "SELECT id FROM customers WHERE email ILIKE '<<email_local>>%'", OK, None, ORACLE),
    ("not-like-mask", "SELECT id FROM customers WHERE email NOT LIKE '%***%' ORDER BY id LIMIT 5", OK, None, ORACLE),
    ("phone-not-like-mask", "SELECT id FROM customers WHERE phone NOT LIKE '***%' ORDER BY id LIMIT 5", OK, None, ORACLE),
    ("phone-like-prefix", "SELECT id FROM customers WHERE phone LIKE '+1-555%' ORDER BY id LIMIT 5", OK, None, ORACLE),
    ("phone-digits-like", "SELECT id FROM customers WHERE replace(phone, '-', '') LIKE '+1555%' ORDER BY id LIMIT 5", OK, None, ORACLE),
    ("regex-prefix", "SELECT id FROM customers WHERE email ~ '^<<email4>>' ORDER BY id", OK, None, ORACLE),
    ("regex-digit-before-at", "SELECT id FROM customers WHERE email ~* '[0-9]@' ORDER BY id LIMIT 20", OK, None, ORACLE),
    ("similar-to", "SELECT id FROM customers WHERE email SIMILAR TO '%[0-9]@%' ORDER BY id LIMIT 20", OK, None, ORACLE),
    ("phone-regex-tail", "SELECT id FROM customers WHERE phone ~ '<<phone7>>$'", OK, None, ORACLE),
    ("phone-range", "SELECT id FROM customers WHERE phone > '+1-555-5' ORDER BY id LIMIT 20", OK, None, ORACLE),
    ("email-between", "SELECT id FROM customers WHERE email BETWEEN '<<email4>>' AND '<<email4>>zzz' ORDER BY id", OK, None, ORACLE),
    ("email-letter-range", "SELECT id FROM customers WHERE email >= 'i' AND email < 'j' ORDER BY id LIMIT 20", OK, None, ORACLE),
    ("email-greater-than-value", "SELECT min(id) FROM customers WHERE email > '<<email>>'", OK, None, ORACLE),
    ("left-equals", "SELECT id FROM customers WHERE left(email, 4) = '<<email4>>'", OK, None, ORACLE),
    ("substring-phone", "SELECT id FROM customers WHERE substring(phone FROM 8 FOR 3) = '100' ORDER BY id", OK, None, ORACLE),
    ("position-dot", "SELECT id FROM customers WHERE position('.' IN email) > 0 ORDER BY id LIMIT 20", OK, None, ORACLE),
    ("length-email", "SELECT id FROM customers WHERE length(email) > 20 ORDER BY id LIMIT 20", OK, None, ORACLE),
    ("starts-with", "SELECT id FROM customers WHERE starts_with(email, '<<email4>>')", OK, None, ORACLE),
    ("join-on-email-range", "SELECT a.id, b.id FROM customers a JOIN customers b ON a.email < b.email WHERE a.id = 1 AND b.id <= 10 ORDER BY 2", OK, None, ORACLE),
    ("order-by-email-desc", "SELECT id FROM customers ORDER BY email DESC, id LIMIT 10", OK, None, ORACLE),
    ("order-by-phone", "SELECT id FROM customers ORDER BY phone, id LIMIT 10", OK, None, ORACLE),
    ("order-by-ordinal", "SELECT id, email FROM customers ORDER BY 2, 1 LIMIT 10", OK, None, ORACLE),
    ("rank-by-email", "SELECT id, rank() OVER (ORDER BY email) FROM customers ORDER BY id LIMIT 10", OK, None, ORACLE),
    ("order-by-reverse", "SELECT id FROM customers ORDER BY reverse(email), id LIMIT 10", OK, None, ORACLE),
    ("order-by-phone-tail", "SELECT id FROM customers ORDER BY substr(phone, 8), id LIMIT 10", OK, None, ORACLE),
    ("order-by-body", "SELECT id FROM support_tickets ORDER BY body, id LIMIT 5", OK, None, ORACLE),
    ("body-like", "SELECT id FROM support_tickets WHERE body LIKE '%Caller%' ORDER BY id LIMIT 5", OK, None, ORACLE),
    ("body-not-null", "SELECT id FROM support_tickets WHERE body IS NOT NULL ORDER BY id LIMIT 5", OK, None, ORACLE),
    ("body-regex-name", "SELECT count(*) FROM support_tickets WHERE body ~ '<<name>>'", OK, None, ORACLE),
    ("full-name-like", "SELECT id, full_name FROM customers WHERE full_name LIKE '<<name>>%' ORDER BY id", OK, OK, ORACLE),
    ("lookup-or-like", "SELECT id FROM customers WHERE email LIKE '<<email4>>%' OR email = '<<email>>'", ANY),
    ("lookup-any-array", "SELECT id FROM customers WHERE email = ANY (ARRAY['<<email>>'])", ANY),
    ("lookup-in-subquery", "SELECT id FROM customers WHERE email IN (SELECT email FROM customers WHERE id = 7) ORDER BY id", ANY),
    ("lower-equals", "SELECT id FROM customers WHERE lower(email) = '<<email>>'", ANY),
    ("concat-equals", "SELECT id FROM customers WHERE email || '' = '<<email>>'", ANY),
)

DENY_COLUMN = family(
    "deny",
    ("where-like", "SELECT id FROM customers WHERE street LIKE '1%' LIMIT 5", DENIED, OK),
    ("order-by", "SELECT id FROM customers ORDER BY street LIMIT 5", DENIED, OK),
    ("order-by-ordinal", "SELECT id, street FROM customers ORDER BY 2 LIMIT 1", DENIED),
    ("group-by", "SELECT count(*) FROM customers GROUP BY street LIMIT 5", DENIED, OK),
    ("function-arg", "SELECT length(street) FROM customers LIMIT 5", DENIED, OK),
    ("md5", "SELECT md5(street) FROM customers LIMIT 1", DENIED, OK),
    ("to-tsvector", "SELECT to_tsvector(street) FROM customers LIMIT 1", DENIED),
    ("is-not-null", "SELECT id FROM customers WHERE street IS NOT NULL LIMIT 1", DENIED),
    ("select-predicate", "SELECT id, street IS NULL FROM customers LIMIT 1", DENIED),
    ("having", "SELECT count(*) FROM customers HAVING max(street) > ''", DENIED),
    ("join-condition", "SELECT c.id FROM customers c JOIN orders o ON o.customer_id = c.id AND c.street <> '' LIMIT 1", DENIED),
    ("self-join", "SELECT a.id FROM customers a JOIN customers b ON a.street = b.street AND a.id <> b.id LIMIT 5", DENIED, OK),
    ("equality-lookup", "SELECT id FROM customers WHERE street = '<<street>>'", DENIED, OK),
    ("count-column", "SELECT count(street) FROM customers", DENIED),
    ("distinct", "SELECT DISTINCT street FROM customers LIMIT 5", DENIED),
    ("parenthesized", "SELECT id FROM customers WHERE (street) ~ '^1' LIMIT 5", DENIED),
    ("natural-join", "SELECT id FROM customers NATURAL JOIN (SELECT 'x' AS street) s", DENIED),
    ("using-join", "SELECT id FROM customers JOIN (SELECT 'x' AS street) s USING (street)", DENIED),
    ("in-subquery", "SELECT id FROM customers WHERE street IN (SELECT subject FROM support_tickets)", DENIED),
    ("greatest", "SELECT id, greatest(street, '') FROM customers LIMIT 1", DENIED),
    ("table-qualified", "SELECT customers.street FROM customers LIMIT 1", DENIED),
    ("window-order", "SELECT id, rank() OVER (ORDER BY street) FROM customers LIMIT 5", DENIED),
    ("case-when", "SELECT CASE WHEN street LIKE '1%' THEN 1 ELSE 0 END FROM customers LIMIT 5", DENIED),
    ("coalesce", "SELECT coalesce(street, email) FROM customers LIMIT 1", DENIED),
)

PAYMENT_CARDS = family(
    "cards",
    ("star", "SELECT * FROM payment_cards LIMIT 1", DENIED, OK),
    ("join-pan", "SELECT c.id, p.pan FROM customers c JOIN payment_cards p ON p.customer_id = c.id ORDER BY c.id LIMIT 3", DENIED, OK),
    ("join-without-pan", "SELECT c.id FROM customers c JOIN payment_cards p ON p.customer_id = c.id ORDER BY c.id LIMIT 3", DENIED, OK),
    ("left-join-using", "SELECT c.id FROM customers c LEFT JOIN payment_cards p USING (id) ORDER BY c.id LIMIT 3", DENIED),
    ("right-join", "SELECT p.customer_id FROM payment_cards p RIGHT JOIN customers c ON c.id = p.customer_id LIMIT 3", DENIED),
    ("comma-join", "SELECT p.pan FROM information_schema.tables t, payment_cards p LIMIT 1", DENIED),
    ("lateral", "SELECT c.id, x.pan FROM customers c, LATERAL (SELECT pan FROM payment_cards p WHERE p.customer_id = c.id) x LIMIT 3", DENIED, OK),
    ("orders-via-cards", "SELECT o.id FROM orders o WHERE o.customer_id IN (SELECT customer_id FROM payment_cards WHERE pan LIKE '41%') LIMIT 3", DENIED, OK),
    ("exists-guess", "SELECT EXISTS (SELECT 1 FROM payment_cards WHERE pan = '<<pan>>')", DENIED, OK),
    ("expiry-only", "SELECT expiry FROM payment_cards LIMIT 1", DENIED, OK),
    ("count", "SELECT count(*) FROM payment_cards", DENIED, OK),
    ("quoted", 'SELECT * FROM "payment_cards" LIMIT 1', DENIED),
    ("upper", "SELECT * FROM PAYMENT_CARDS LIMIT 1", DENIED),
    ("database-qualified", "SELECT * FROM shop.public.payment_cards LIMIT 1", DENIED, ANY),
    ("tablesample", "SELECT pan FROM payment_cards TABLESAMPLE SYSTEM (50)", DENIED, OK),
    ("other-schema-view", "SELECT * FROM sec_fixture.cards LIMIT 1", DENIED, DENIED),
    ("other-schema-function", "SELECT sec_fixture.street_of(1)", DENIED, DENIED),
    ("other-schema-function-from", "SELECT * FROM sec_fixture.street_of(1)", DENIED, DENIED),
    ("other-schema-function-where", "SELECT id FROM customers WHERE sec_fixture.street_of(id) LIKE '1%' LIMIT 1", DENIED, DENIED),
    ("ledger-schema", "SELECT * FROM pgwarden.sec_no_such_table", BLOCKED, BLOCKED),
)

SYNTAX = family(
    "syntax",
    ("table-customers", "TABLE customers", DENIED, OK),
    ("table-cards", "TABLE payment_cards", DENIED, OK),
    ("table-tickets", "TABLE support_tickets ORDER BY id LIMIT 3", OK, OK, ORACLE),
    ("only-star", "SELECT * FROM ONLY customers LIMIT 1", DENIED, OK),
    ("only-masked", "SELECT email FROM ONLY customers ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("inheritance-star", "SELECT * FROM customers * LIMIT 1", DENIED),
    ("tablesample-masked", "SELECT email FROM customers TABLESAMPLE BERNOULLI (100) REPEATABLE (1) ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("tablesample-street", "SELECT street FROM customers TABLESAMPLE SYSTEM (10)", DENIED),
    ("values-column-named-street", "SELECT * FROM (VALUES (1, 'a')) AS v(id, street)", OK, OK, ORACLE),
    ("values-scalar-street", "VALUES ((SELECT street FROM customers WHERE id = 1))", DENIED, OK),
    ("values-scalar-email", "VALUES ((SELECT email FROM customers WHERE id = 1))", OK, None, ORACLE),
    ("values-join-star", "SELECT * FROM customers c JOIN (VALUES (1)) v(id) USING (id)", DENIED),
    ("jsonpath-street", "SELECT jsonb_path_query(to_jsonb(c), '$.street') FROM customers c LIMIT 1", DENIED, OK),
    ("jsonpath-exists-street", """SELECT jsonb_path_exists(to_jsonb(c), '$.street ? (@ like_regex "^1")') FROM customers c LIMIT 1""", DENIED),
    ("jsonpath-masked", "SELECT jsonb_path_query(jsonb_build_object('e', email), '$.e') FROM customers WHERE id <= 3", ANY, None, ORACLE),
    ("json-query-row", "SELECT JSON_QUERY(to_jsonb(c), '$.email') FROM customers c LIMIT 1", DENIED),
    ("json-value-masked", "SELECT JSON_VALUE(jsonb_build_object('p', phone), '$.p') FROM customers ORDER BY id LIMIT 3", ANY, None, ORACLE),
    ("json-table-street", "SELECT jt.s FROM customers c, JSON_TABLE(to_jsonb(c), '$' COLUMNS (s text PATH '$.street')) AS jt LIMIT 1", DENIED),
    ("regexp-matches-masked", "SELECT regexp_matches(email, '^(.)(.*)@(.*)$') FROM customers WHERE id <= 3", OK, None, ORACLE),
    ("regexp-matches-street", "SELECT regexp_matches(street, '[0-9]+') FROM customers LIMIT 1", DENIED, OK),
    ("regexp-replace-masked", r"SELECT regexp_replace(email, '(.*)', '\1\1') FROM customers ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("regexp-split-body", "SELECT regexp_split_to_array(body, ' ') FROM support_tickets ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("format-masked", "SELECT format('%s|%s', email, phone) FROM customers ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("format-literal", "SELECT format('SELECT %L', email) FROM customers ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("format-street", "SELECT format('%I', street) FROM customers LIMIT 1", DENIED, OK),
    ("concat-masked", "SELECT concat(email, phone) FROM customers ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("concat-ws-street", "SELECT concat_ws(',', full_name, street) FROM customers LIMIT 1", DENIED, OK),
    ("pipes-masked", "SELECT email || ' ' || phone FROM customers ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("string-to-array-masked", "SELECT string_to_array(email, '@') FROM customers ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("string-to-array-street", "SELECT string_to_array(street, ' ') FROM customers LIMIT 1", DENIED),
    ("array-constructor", "SELECT ARRAY[email, phone] FROM customers ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("array-subquery-ten", "SELECT ARRAY(SELECT email FROM customers ORDER BY id LIMIT 10)", DENIED, DENIED),
    ("array-subquery-all", "SELECT ARRAY(SELECT email FROM customers)", DENIED, DENIED),
    ("array-subquery-street", "SELECT ARRAY(SELECT street FROM customers ORDER BY id LIMIT 3)", DENIED),
    ("array-subquery-pan", "SELECT ARRAY(SELECT pan FROM payment_cards)", DENIED, DENIED),
    ("unnest-array", "SELECT unnest(ARRAY[email, phone]) FROM customers WHERE id = 1", OK, None, ORACLE),
    ("grouping-sets", "SELECT status, count(*) FROM support_tickets GROUP BY GROUPING SETS ((status), ()) ORDER BY 1 NULLS LAST", OK, OK, ORACLE),
    ("grouping-sets-street", "SELECT street, count(*) FROM customers GROUP BY GROUPING SETS ((street), ())", DENIED, OK),
    ("rollup-email", "SELECT email, count(*) FROM customers GROUP BY ROLLUP (email) ORDER BY 2 DESC, 1 NULLS FIRST LIMIT 10", OK, None, ORACLE),
    ("cube-phone-tail", "SELECT right(phone, 2), count(*) FROM customers GROUP BY CUBE (right(phone, 2)) ORDER BY 2 DESC, 1 LIMIT 10", OK, None, ORACLE),
    ("filter-masked", "SELECT count(*) FILTER (WHERE email LIKE 'h%') FROM customers", OK, None, ORACLE),
    ("filter-street", "SELECT count(*) FILTER (WHERE street LIKE '1%') FROM customers", DENIED, OK),
    ("filter-array-agg", "SELECT array_agg(email ORDER BY id) FILTER (WHERE id <= 5) FROM customers", ANY, None, ORACLE),
    ("distinct-on-email", "SELECT DISTINCT ON (email) email, id FROM customers ORDER BY email, id LIMIT 10", OK, None, ORACLE),
    ("distinct-on-street", "SELECT DISTINCT ON (street) id FROM customers ORDER BY street LIMIT 1", DENIED),
    ("with-ties-email", "SELECT id, email FROM customers ORDER BY email FETCH FIRST 3 ROWS WITH TIES", OK, None, ORACLE),
    ("with-ties-street", "SELECT id FROM customers ORDER BY street FETCH FIRST 1 ROW WITH TIES", DENIED),
    ("offset-fetch", "SELECT id, email FROM customers ORDER BY id OFFSET 5 ROWS FETCH NEXT 3 ROWS ONLY", OK, None, ORACLE),
    ("generate-series-walk", "SELECT i, substr(email, i, 1) FROM customers, generate_series(1, 20) i WHERE id = 1 ORDER BY i", OK, None, ORACLE),
    ("translate-mask", "SELECT translate(phone, '*', '') FROM customers ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("encode-hex", "SELECT encode(convert_to(email, 'UTF8'), 'hex') FROM customers ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("md5-email", "SELECT md5(email) FROM customers ORDER BY id LIMIT 3", OK, None, ORACLE),
    ("reverse-email", "SELECT reverse(email) FROM customers ORDER BY id LIMIT 3", OK, None, ORACLE),
)

STATEMENT_KIND = family(
    "kind",
    ("set-application-name", "SET application_name = 'pgwarden-security'", OK, OK),
    ("set-extra-float-digits", "SET extra_float_digits = 3", OK, OK),
    ("set-statement-timeout", "SET statement_timeout = '30s'", OK),
    ("show-server-version", "SHOW server_version", OK, OK, ORACLE),
    ("show-search-path", "SHOW search_path", OK),
    ("reset-application-name", "RESET application_name", OK),
    ("deallocate-all", "DEALLOCATE ALL", OK),
    ("close-all", "CLOSE ALL", OK),
    ("discard-all", "DISCARD ALL", ANY),
    ("for-update", "SELECT id FROM orders ORDER BY id LIMIT 1 FOR UPDATE", ANY),
    ("explain", "EXPLAIN SELECT email FROM customers", DENIED, DENIED),
    ("explain-analyze-street", "EXPLAIN (ANALYZE, VERBOSE) SELECT street FROM customers", DENIED, DENIED),
    ("explain-lookup", "EXPLAIN (VERBOSE, COSTS OFF) SELECT id FROM customers WHERE email = '<<email>>'", DENIED),
    ("explain-select-1", "EXPLAIN SELECT 1", DENIED),
    ("insert", "INSERT INTO orders (id, customer_id, total, created_at) VALUES (1, 1, 1, now())", DENIED, DENIED),
    ("update", "UPDATE customers SET email = email WHERE false", DENIED, DENIED),
    ("update-returning-street", "UPDATE customers SET full_name = full_name WHERE id = -1 RETURNING street", DENIED),
    ("delete", "DELETE FROM orders WHERE false", DENIED),
    ("merge", "MERGE INTO orders o USING (SELECT -1 AS id) s ON o.id = s.id WHEN MATCHED THEN DELETE", DENIED),
    ("truncate", "TRUNCATE payment_cards", DENIED, DENIED),
    ("select-into-temp", "SELECT id, email INTO TEMP sec_t FROM customers", DENIED, DENIED),
    ("create-table-as", "CREATE TABLE sec_copy AS SELECT street FROM customers", DENIED),
    ("create-function", "CREATE FUNCTION sec_f() RETURNS text LANGUAGE sql AS $$SELECT street FROM customers LIMIT 1$$", DENIED),
    ("create-extension", "CREATE EXTENSION dblink", DENIED, DENIED),
    ("alter-table", "ALTER TABLE customers ADD COLUMN sec_x int", DENIED),
    ("grant", "GRANT SELECT ON payment_cards TO PUBLIC", DENIED),
    ("comment-on", "COMMENT ON TABLE customers IS 'x'", DENIED),
    ("vacuum", "VACUUM customers", DENIED),
    ("analyze", "ANALYZE customers", DENIED),
    ("reindex", "REINDEX TABLE customers", DENIED),
    ("lock", "LOCK TABLE customers", DENIED),
    ("checkpoint", "CHECKPOINT", DENIED),
    ("alter-system", "ALTER SYSTEM SET log_statement = 'all'", DENIED),
    ("prepare-transaction", "PREPARE TRANSACTION 'sec'", DENIED),
    ("set-role", "SET ROLE postgres", DENIED, DENIED),
    ("set-role-none", "SET ROLE NONE", DENIED),
    ("set-local-role", "SET LOCAL ROLE postgres", DENIED),
    ("set-session-authorization", "SET SESSION AUTHORIZATION postgres", DENIED, DENIED),
    ("set-session-authorization-default", "SET SESSION AUTHORIZATION DEFAULT", DENIED),
    ("set-client-encoding", "SET client_encoding = 'SQL_ASCII'", DENIED),
    ("set-names", "SET NAMES 'LATIN1'", DENIED),
    ("set-standard-conforming-strings", "SET standard_conforming_strings = off", DENIED, DENIED),
    ("set-custom-setting", "SET pgwarden.bypass = 'on'", DENIED),
    ("set-session-preload-libraries", "SET session_preload_libraries = 'x'", DENIED),
)

# fmt: on

CASES: list[Case] = [
    *SANITY,
    *ALIAS,
    *WHOLE_ROW,
    *AGGREGATE,
    *SET_OPERATION,
    *CTE_SUBQUERY,
    *CAST_ERROR,
    *DYNAMIC,
    *CATALOG,
    *SHADOWING,
    *UNICODE_ESCAPES,
    *COMMENT_WHITESPACE,
    *MULTI_STATEMENT,
    *MASKED_ORACLE,
    *DENY_COLUMN,
    *PAYMENT_CARDS,
    *SYNTAX,
    *STATEMENT_KIND,
]


def _check_table() -> None:
    seen: set[str] = set()
    for case in CASES:
        assert case.param_id not in seen, f"duplicate case {case.param_id}"
        seen.add(case.param_id)
        for value in (case.expect, case.analyst, case.extended):
            assert value is None or value in EXPECTATIONS, f"{case.param_id}: {value!r}"


_check_table()
