// pgjdbc scenarios of pgwarden's compatibility matrix; driven by tests/compat/test_jdbc.py.
//
// Usage: PGW_HOST=127.0.0.1 PGW_PORT=6432 PGW_USER=alice PGW_PASSWORD=... PGW_LOOKUP_SQL=...
//        (every PGW_* variable test_jdbc.py sets: the scenario's statements, with ? markers,
//        and the customer) java -cp build:/usr/share/java/postgresql.jar Compat [feature ...]
//
// Prints one JSON line per feature: {"feature", "facts": {...}, "received": [...]}, or with
// "crash" when the scenario itself failed. The program judges nothing: it reports what the
// driver did (rows, SQLSTATEs, counts) and every value it received (rows, error and
// warning fields, notification payloads, binary values decoded) so that the test can
// assert on them and run the PII leak check. It prints nothing but those JSON lines.

import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.SQLWarning;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.PGStatement;

public class Compat {
    static final int CANCEL_LIMIT_MS = 20000; // a cancel that never lands fails, not hangs

    static String env(String name) {
        String value = System.getenv(name);
        if (value == null) {
            throw new IllegalStateException(name + " is not set");
        }
        return value;
    }

    static final String URL = "jdbc:postgresql://" + env("PGW_HOST") + ":" + env("PGW_PORT") + "/shop";

    /** What one feature learnt: facts for the assertions, every received value for the leak check. */
    static final class Rec {
        final Map<String, Object> facts = new LinkedHashMap<>();
        final List<String> received = new ArrayList<>();

        void put(String key, Object value) {
            facts.put(key, value);
        }

        /** Every row of rs as a list of values (getObject; byte arrays decoded as UTF-8). */
        List<List<Object>> rows(ResultSet rs) throws SQLException {
            List<List<Object>> out = new ArrayList<>();
            ResultSetMetaData md = rs.getMetaData();
            while (rs.next()) {
                out.add(row(rs, md));
            }
            warnings(rs.getWarnings());
            rs.close();
            return out;
        }

        List<Object> row(ResultSet rs, ResultSetMetaData md) throws SQLException {
            List<Object> row = new ArrayList<>();
            for (int i = 1; i <= md.getColumnCount(); i++) {
                Object value = rs.getObject(i);
                if (value instanceof byte[]) {
                    value = new String((byte[]) value, StandardCharsets.UTF_8);
                } else if (value != null && !(value instanceof Number) && !(value instanceof Boolean)) {
                    value = value.toString();
                }
                row.add(value);
                if (value != null) {
                    received.add(value.toString());
                }
            }
            return row;
        }

        /** {ok: false, error: {code, message, hint}}; message and hint as the server sent them. */
        Map<String, Object> error(SQLException e) {
            Map<String, Object> error = new LinkedHashMap<>();
            error.put("code", e.getSQLState());
            error.put("message", e.getMessage());
            error.put("hint", null);
            received.add(String.valueOf(e.getMessage()));
            if (e instanceof org.postgresql.util.PSQLException) {
                org.postgresql.util.ServerErrorMessage sem =
                        ((org.postgresql.util.PSQLException) e).getServerErrorMessage();
                if (sem != null) {
                    error.put("message", sem.getMessage());
                    error.put("hint", sem.getHint());
                    for (String s : new String[] {sem.getMessage(), sem.getDetail(), sem.getHint(),
                            sem.getWhere(), sem.getInternalQuery()}) {
                        if (s != null) {
                            received.add(s);
                        }
                    }
                }
            }
            Map<String, Object> out = new LinkedHashMap<>();
            out.put("ok", false);
            out.put("error", error);
            return out;
        }

        void warnings(SQLWarning w) {
            for (; w != null; w = w.getNextWarning()) {
                received.add(String.valueOf(w.getMessage()));
            }
        }
    }

    interface Body {
        void run(Connection conn) throws Exception;
    }

    interface Attempt {
        Object run() throws SQLException;
    }

    static Connection connect(Properties extra) throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", env("PGW_USER"));
        props.setProperty("password", env("PGW_PASSWORD"));
        props.setProperty("sslmode", "disable");
        props.setProperty("connectTimeout", "10");
        props.setProperty("ApplicationName", "pgwarden compat (pgjdbc start-up)");
        if (extra != null) {
            props.putAll(extra);
        }
        return DriverManager.getConnection(URL, props);
    }

    static void with(Properties extra, Body body) throws Exception {
        try (Connection conn = connect(extra)) {
            body.run(conn);
        }
    }

    /** {ok: true, value} or, for an error the server (or pgwarden) sent, {ok: false, error}. */
    static Object attempt(Rec rec, Attempt body) {
        try {
            Object value = body.run();
            Map<String, Object> out = new LinkedHashMap<>();
            out.put("ok", true);
            out.put("value", value);
            return out;
        } catch (SQLException e) {
            return rec.error(e);
        }
    }

    static List<List<Object>> query(Rec rec, Connection conn, String sql, Object... params)
            throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement(sql)) {
            for (int i = 0; i < params.length; i++) {
                ps.setObject(i + 1, params[i]);
            }
            return rec.rows(ps.executeQuery());
        }
    }

    static boolean usable(Rec rec, Connection conn) throws SQLException {
        List<List<Object>> rows = query(rec, conn, "SELECT 1");
        return rows.size() == 1 && Integer.valueOf(1).equals(rows.get(0).get(0));
    }

    // --- features -------------------------------------------------------------------

    static boolean ok(Object outcome) {
        return Boolean.TRUE.equals(((Map<?, ?>) outcome).get("ok"));
    }

    static int customerId() {
        return Integer.parseInt(env("PGW_CUSTOMER_ID"));
    }

    static void login(Rec rec) throws Exception {
        with(null, conn -> {
            DatabaseMetaData md = conn.getMetaData();
            rec.put("product", md.getDatabaseProductName());
            rec.put("product_version", md.getDatabaseProductVersion());
            rec.put("driver_version", md.getDriverVersion());
            rec.put("user_name", md.getUserName());
            // what pgjdbc (and DBeaver through it) sends as SQL after the start-up
            try (Statement st = conn.createStatement()) {
                st.execute("SET extra_float_digits = 3");
            }
            conn.setClientInfo("ApplicationName", "pgwarden compat (pgjdbc)");
            rec.put("isolation", conn.getTransactionIsolation()); // SHOW TRANSACTION ISOLATION LEVEL
            conn.setReadOnly(true); // SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY
            rec.put("read_only", conn.isReadOnly());
            conn.setReadOnly(false);
            List<List<Object>> rows = query(rec, conn,
                    "SELECT version(), current_setting('server_version_num'), current_database(),"
                            + " current_setting('application_name'), current_setting('extra_float_digits')");
            rec.put("row", rows.get(0));
            rec.put("valid", conn.isValid(5));
        });
    }

    static void lookupByEmail(Rec rec) throws Exception {
        with(null, conn -> rec.put("rows", query(rec, conn, env("PGW_LOOKUP_SQL"), env("PGW_LOOKUP_EMAIL"))));
    }

    static void listTickets(Rec rec) throws Exception {
        with(null, conn -> rec.put("rows", query(rec, conn, env("PGW_TICKETS_SQL"), customerId())));
    }

    static void refusedSqlstate(Rec rec) throws Exception {
        with(null, conn -> {
            rec.put("refused", attempt(rec, () -> query(rec, conn, env("PGW_REFUSED_SQL")).size()));
            rec.put("usable_after", usable(rec, conn));
        });
    }

    static void rowCap(Rec rec) throws Exception {
        with(null, conn -> {
            rec.put("all", attempt(rec, () -> query(rec, conn, env("PGW_ROW_CAP_SQL")).size()));
            rec.put("usable_after", usable(rec, conn));
        });
    }

    static void preparedReuse(Rec rec) throws Exception {
        with(null, conn -> {
            List<List<Object>> rows = new ArrayList<>();
            try (PreparedStatement ps = conn.prepareStatement(env("PGW_PREPARED_SQL"))) {
                int runs = Integer.parseInt(env("PGW_PREPARED_RUNS"));
                for (int i = 0; i < runs; i++) {
                    ps.setInt(1, i + 1);
                    rows.addAll(rec.rows(ps.executeQuery()));
                }
                // prepareThreshold (default 5) reached: a named server-side statement
                rec.put("server_prepared", ps.unwrap(PGStatement.class).isUseServerPrepare());
            }
            rec.put("rows", rows);
        });
    }

    static void transactionRollback(Rec rec) throws Exception {
        with(null, conn -> {
            conn.setAutoCommit(false);
            query(rec, conn, "SELECT count(*) FROM orders");
            rec.put("failed", attempt(rec, () -> query(rec, conn, "SELECT 1 / 0").size()));
            rec.put("aborted", attempt(rec, () -> query(rec, conn, "SELECT 1").size()));
            conn.rollback();
            rec.put("usable_after", usable(rec, conn));
            conn.rollback();
            // a write rolled back (a role that may not write is refused: that is asserted too)
            rec.put("write", attempt(rec, () -> {
                try (Statement st = conn.createStatement()) {
                    st.execute("CREATE TEMP TABLE compat_tx (x int)");
                    st.execute("INSERT INTO compat_tx VALUES (1), (2)");
                } finally {
                    conn.rollback();
                }
                Object left = attempt(rec, () -> query(rec, conn, "SELECT x FROM compat_tx").size());
                conn.rollback();
                return left;
            }));
            conn.setAutoCommit(true);
            rec.put("usable_at_end", usable(rec, conn));
        });
    }

    /**
     * Poll pg_stat_activity on a direct superuser connection (PGW_ADMIN_*, not through
     * pgwarden) until a query of that application_name runs upstream.
     */
    static boolean waitUntilActive(String app) throws Exception {
        Properties props = new Properties();
        props.setProperty("user", env("PGW_ADMIN_USER"));
        props.setProperty("password", env("PGW_ADMIN_PASSWORD"));
        props.setProperty("sslmode", "disable");
        String url = "jdbc:postgresql://" + env("PGW_ADMIN_HOST") + ":" + env("PGW_ADMIN_PORT") + "/shop";
        try (Connection admin = DriverManager.getConnection(url, props);
                PreparedStatement ps = admin.prepareStatement(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = ? AND state = 'active'")) {
            ps.setString(1, app);
            for (int i = 0; i < 750; i++) {
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    if (rs.getLong(1) > 0) {
                        return true;
                    }
                }
                Thread.sleep(20);
            }
        }
        return false;
    }

    static void cancel(Rec rec) throws Exception {
        String app = "pgwarden compat cancel " + ProcessHandle.current().pid();
        Properties props = new Properties();
        props.setProperty("ApplicationName", app);
        with(props, conn -> {
            try (Statement setup = conn.createStatement()) {
                setup.execute("SET statement_timeout = " + CANCEL_LIMIT_MS);
            }
            ExecutorService pool = Executors.newSingleThreadExecutor();
            try (Statement st = conn.createStatement()) {
                Future<Object> running = pool.submit(
                        () -> attempt(rec, () -> rec.rows(st.executeQuery(env("PGW_LONG_SQL"))).size()));
                rec.put("running", waitUntilActive(app));
                st.cancel(); // a CancelRequest with the key pgwarden gave this session
                rec.put("result", running.get(CANCEL_LIMIT_MS * 2L, TimeUnit.MILLISECONDS));
            } finally {
                pool.shutdownNow();
            }
            rec.put("usable_after", usable(rec, conn));
        });
    }

    static void listenNotify(Rec rec) throws Exception {
        String channel = env("PGW_CHANNEL");
        with(null, listener -> {
            Object listen = attempt(rec, () -> {
                try (Statement st = listener.createStatement()) {
                    st.execute("LISTEN " + channel);
                }
                return null;
            });
            rec.put("listen", listen);
            if (ok(listen)) {
                with(null, notifier -> query(rec, notifier, "SELECT pg_notify(?, ?)", channel, "hello from pgjdbc"));
                PGConnection pgc = listener.unwrap(PGConnection.class);
                List<Object> heard = new ArrayList<>();
                for (int i = 0; i < 100 && heard.isEmpty(); i++) {
                    PGNotification[] got = pgc.getNotifications(100);
                    for (PGNotification n : got == null ? new PGNotification[0] : got) {
                        heard.add(List.of(n.getName(), n.getParameter()));
                        rec.received.add(n.getParameter());
                    }
                }
                rec.put("notifications", heard);
                try (Statement st = listener.createStatement()) {
                    st.execute("UNLISTEN " + channel);
                }
            }
            rec.put("usable_after", usable(rec, listener));
        });
    }

    /** The named columns of every row (the leak check still sees every column). */
    static List<Object> columns(Rec rec, ResultSet rs, String... names) throws SQLException {
        List<Object> out = new ArrayList<>();
        ResultSetMetaData md = rs.getMetaData();
        while (rs.next()) {
            List<Object> row = rec.row(rs, md);
            List<Object> picked = new ArrayList<>();
            for (String name : names) {
                picked.add(row.get(rs.findColumn(name) - 1));
            }
            out.add(names.length == 1 ? picked.get(0) : picked);
        }
        rs.close();
        return out;
    }

    /** The DatabaseMetaData calls DBeaver's navigator makes, and getTypeInfo. */
    static void metadata(Rec rec) throws Exception {
        with(null, conn -> {
            DatabaseMetaData md = conn.getMetaData();
            rec.put("schemas", attempt(rec, () -> columns(rec, md.getSchemas(), "TABLE_SCHEM")));
            rec.put("tables", attempt(rec, () -> columns(rec,
                    md.getTables(null, "public", "%", new String[] {"TABLE"}), "TABLE_NAME")));
            rec.put("columns", attempt(rec, () -> columns(rec,
                    md.getColumns(null, "public", "customers", "%"), "COLUMN_NAME", "TYPE_NAME")));
            rec.put("primary_keys", attempt(rec, () -> columns(rec,
                    md.getPrimaryKeys(null, "public", "customers"), "COLUMN_NAME", "PK_NAME")));
            rec.put("index_info", attempt(rec, () -> columns(rec,
                    md.getIndexInfo(null, "public", "customers", false, true), "INDEX_NAME", "COLUMN_NAME")));
            rec.put("imported_keys", attempt(rec, () -> columns(rec,
                    md.getImportedKeys(null, "public", "support_tickets"), "PKTABLE_NAME", "FKCOLUMN_NAME")));
            rec.put("all_tables", attempt(rec, () -> columns(rec,
                    md.getTables(null, null, "%", null), "TABLE_NAME").size()));
            rec.put("type_info", attempt(rec, () -> columns(rec, md.getTypeInfo(), "TYPE_NAME").size()));
            rec.put("usable_after", usable(rec, conn));
        });
    }

    static void prepareThreshold(Rec rec) throws Exception {
        Properties props = new Properties();
        props.setProperty("prepareThreshold", "3");
        with(props, conn -> {
            List<Object> serverPrepared = new ArrayList<>();
            List<List<Object>> rows = new ArrayList<>();
            try (PreparedStatement ps = conn.prepareStatement(env("PGW_PREPARED_SQL"))) {
                for (int i = 1; i <= 8; i++) {
                    ps.setInt(1, i);
                    rows.addAll(rec.rows(ps.executeQuery()));
                    serverPrepared.add(ps.unwrap(PGStatement.class).isUseServerPrepare());
                }
            }
            rec.put("server_prepared", serverPrepared);
            rec.put("rows", rows);
            rec.put("named_statements", attempt(rec, () -> query(rec, conn,
                    "SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql").get(0).get(0)));
        });
    }

    /** With autocommit off and a fetch size, pgjdbc reads a portal in batches. */
    static void fetchSize(Rec rec) throws Exception {
        with(null, conn -> {
            conn.setAutoCommit(false);
            try (PreparedStatement ps = conn.prepareStatement(
                    "SELECT id, email FROM customers WHERE id <= ? ORDER BY id")) {
                ps.setFetchSize(10);
                ps.setInt(1, 45);
                rec.put("small", rec.rows(ps.executeQuery()).size());
            }
            int[] delivered = {0};
            rec.put("big", attempt(rec, () -> {
                try (PreparedStatement ps = conn.prepareStatement(env("PGW_ROW_CAP_SQL"))) {
                    ps.setFetchSize(20);
                    ResultSet rs = ps.executeQuery();
                    ResultSetMetaData md = rs.getMetaData();
                    while (rs.next()) {
                        rec.row(rs, md);
                        delivered[0]++;
                    }
                    return delivered[0];
                }
            }));
            rec.put("big_delivered", delivered[0]);
            conn.rollback();
            conn.setAutoCommit(true);
            rec.put("usable_after", usable(rec, conn));
        });
    }

    /** Result formats of the last query: 1 is binary. */
    static List<Object> formats(ResultSet rs) throws SQLException {
        org.postgresql.PGResultSetMetaData md = rs.getMetaData().unwrap(org.postgresql.PGResultSetMetaData.class);
        List<Object> out = new ArrayList<>();
        for (int i = 1; i <= rs.getMetaData().getColumnCount(); i++) {
            out.add(md.getFormat(i));
        }
        return out;
    }

    static void binaryTransfer(Rec rec) throws Exception {
        Properties props = new Properties();
        props.setProperty("prepareThreshold", "-1"); // server-prepared from the first execution
        props.setProperty("binaryTransfer", "true");
        with(props, conn -> {
            String[] sqls = {
                env("PGW_LOOKUP_SQL"),
                "SELECT c.id, convert_to(c.email, 'UTF8'), convert_to(c.phone, 'UTF8'), o.total, o.created_at"
                        + " FROM customers c JOIN orders o ON o.customer_id = c.id WHERE c.email = ? ORDER BY o.id",
            };
            String[] keys = {"lookup", "bytes"};
            for (int k = 0; k < sqls.length; k++) {
                try (PreparedStatement ps = conn.prepareStatement(sqls[k])) {
                    ps.setString(1, env("PGW_LOOKUP_EMAIL"));
                    ResultSet rs = ps.executeQuery();
                    rec.put(keys[k] + "_formats", formats(rs));
                    rec.put(keys[k], rec.rows(rs));
                }
            }
        });
    }

    // --- driver ---------------------------------------------------------------------

    interface Feature {
        void run(Rec rec) throws Exception;
    }

    static final Map<String, Feature> FEATURES = new LinkedHashMap<>();

    static {
        FEATURES.put("login", Compat::login);
        FEATURES.put("lookup_by_email", Compat::lookupByEmail);
        FEATURES.put("list_tickets", Compat::listTickets);
        FEATURES.put("refused_sqlstate", Compat::refusedSqlstate);
        FEATURES.put("row_cap", Compat::rowCap);
        FEATURES.put("prepared_reuse", Compat::preparedReuse);
        FEATURES.put("transaction_rollback", Compat::transactionRollback);
        FEATURES.put("cancel", Compat::cancel);
        FEATURES.put("listen_notify", Compat::listenNotify);
        FEATURES.put("metadata", Compat::metadata);
        FEATURES.put("prepare_threshold", Compat::prepareThreshold);
        FEATURES.put("server_cursor", Compat::fetchSize);
        FEATURES.put("binary", Compat::binaryTransfer);
    }

    public static void main(String[] args) {
        List<String> names = args.length > 0 ? List.of(args) : new ArrayList<>(FEATURES.keySet());
        for (String name : names) {
            Rec rec = new Rec();
            Map<String, Object> line = new LinkedHashMap<>();
            line.put("feature", name);
            try {
                Feature feature = FEATURES.get(name);
                if (feature == null) {
                    throw new IllegalArgumentException("unknown feature " + name);
                }
                feature.run(rec);
            } catch (Exception e) {
                line.put("crash", e.toString());
                if (e instanceof SQLException) {
                    line.put("crash_sqlstate", ((SQLException) e).getSQLState());
                }
            }
            line.put("facts", rec.facts);
            line.put("received", rec.received);
            System.out.println(json(line));
            System.out.flush();
        }
    }

    static String json(Object value) {
        StringBuilder out = new StringBuilder();
        write(out, value);
        return out.toString();
    }

    static void write(StringBuilder out, Object value) {
        if (value == null) {
            out.append("null");
        } else if (value instanceof Boolean || value instanceof Integer || value instanceof Long
                || value instanceof Short) {
            out.append(value);
        } else if (value instanceof Map) {
            out.append('{');
            boolean first = true;
            for (Map.Entry<?, ?> e : ((Map<?, ?>) value).entrySet()) {
                if (!first) {
                    out.append(',');
                }
                first = false;
                write(out, String.valueOf(e.getKey()));
                out.append(':');
                write(out, e.getValue());
            }
            out.append('}');
        } else if (value instanceof List) {
            out.append('[');
            boolean first = true;
            for (Object item : (List<?>) value) {
                if (!first) {
                    out.append(',');
                }
                first = false;
                write(out, item);
            }
            out.append(']');
        } else {
            String s = value.toString();
            out.append('"');
            for (int i = 0; i < s.length(); i++) {
                char c = s.charAt(i);
                if (c == '"' || c == '\\') {
                    out.append('\\').append(c);
                } else if (c < 0x20) {
                    out.append(String.format("\\u%04x", (int) c));
                } else {
                    out.append(c);
                }
            }
            out.append('"');
        }
    }
}
