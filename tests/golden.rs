//! Golden files: rows recorded from a real PostgreSQL, for every built-in collector, go
//! through the same steps and metric mapping as in production and must give exactly the
//! exposition text in `tests/golden/<pack>.prom`. A renamed metric or label, a changed help
//! text or type, or a step that computes something else fails here, without a database.
//!
//! - `PGVIGIL_UPDATE_GOLDEN=1 cargo nextest run --test golden` rewrites the `.prom` files
//!   (read the diff before committing it).
//! - `cargo nextest run --test golden --run-ignored only` records the rows again from a
//!   throwaway PostgreSQL with a small workload (`tests/golden/rows/*.yaml`);
//!   `PGVIGIL_RECORD_ONLY=collector,…` records only those collectors' rows (a new pack).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgvigil::collector::names::{NameCache, Relations};
use pgvigil::collector::pack::{Catalog, CollectorDef, BUILTIN_PACKS};
use pgvigil::collector::steps::{CollectorState, Context};
use pgvigil::config::TargetKind;
use pgvigil::exposition::{self, Format};
use pgvigil::postgres::value::{Columns, SqlLabel, SqlNumber};
use pgvigil::store::Snapshot;
use serde_yaml_ng::Value;

/// Collectors whose rows are written by hand, because a short recording on one primary
/// cannot catch them (an index build or a vacuum in progress over several polls;
/// standbys), or because the rows the metrics map are not the query's (`activity`: the
/// sampler's running totals, src/trace/load.rs).
const HAND_WRITTEN: &[&str] = &[
    "create_index_progress",
    "vacuum_progress",
    "replication",
    "standby",
    "activity",
];

/// Polls are this far apart (the steps that use time see it).
const INTERVAL: Duration = Duration::from_secs(15);

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// A recorded row: columns in query order, numbers or text or NULL.
struct Recorded(Vec<(String, Value)>);

impl Columns for Recorded {
    fn index_of(&self, column: &str) -> Option<usize> {
        self.0.iter().position(|(c, _)| c == column)
    }
    fn columns(&self) -> Vec<String> {
        self.0.iter().map(|(c, _)| c.clone()).collect()
    }
    fn number(&self, idx: usize) -> Result<Option<f64>, String> {
        match &self.0[idx].1 {
            Value::Null => Ok(None),
            Value::Number(n) => Ok(n.as_f64()),
            Value::Bool(b) => Ok(Some(f64::from(u8::from(*b)))),
            other => Err(format!("{other:?} is not a number")),
        }
    }
    fn label(&self, idx: usize) -> Result<String, String> {
        Ok(match &self.0[idx].1 {
            Value::Null => String::new(),
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => return Err(format!("{other:?} is not a label")),
        })
    }
}

fn rows_path(collector: &str) -> PathBuf {
    golden_dir().join("rows").join(format!("{collector}.yaml"))
}

/// The recorded polls of `collector`: a list of polls, each a list of rows.
fn recorded_polls(collector: &str) -> Vec<Vec<Recorded>> {
    let path = rows_path(collector);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (record with --run-ignored only)", path.display()));
    let doc: Value =
        serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let polls = doc["polls"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{}: no `polls` list", path.display()));
    polls
        .iter()
        .map(|poll| {
            poll.as_sequence()
                .into_iter()
                .flatten()
                .map(|row| {
                    let map = row
                        .as_mapping()
                        .expect("a row is a mapping of column → value");
                    Recorded(
                        map.iter()
                            .map(|(k, v)| (k.as_str().expect("column name").to_string(), v.clone()))
                            .collect(),
                    )
                })
                .collect()
        })
        .collect()
}

/// The relation-name cache as the recorded `relation_names` rows fill it (last poll), keyed
/// by their `datname` column.
fn recorded_names(catalog: &Catalog) -> NameCache {
    let cache = NameCache::default();
    for c in catalog.collectors.iter().filter(|c| c.cache.is_some()) {
        let last = recorded_polls(&c.name.0).pop().unwrap_or_default();
        let mut by_db: std::collections::BTreeMap<String, Vec<Recorded>> = Default::default();
        for row in last {
            let db = row
                .index_of("datname")
                .and_then(|i| row.label(i).ok())
                .unwrap_or_default();
            by_db.entry(db).or_default().push(row);
        }
        for (db, rows) in by_db {
            let relations = Relations::from_rows(&rows).unwrap_or_else(|e| panic!("{e}"));
            cache.put(&db, relations);
        }
    }
    cache
}

/// Runs the recorded polls of `def` through its steps and mapping; the last poll's result.
fn replay(def: &CollectorDef, names: &NameCache) -> Snapshot {
    let base = vec![(Arc::<str>::from("target"), "golden".to_string())];
    let database = match def.scope {
        pgvigil::collector::pack::Scope::Cluster => "",
        pgvigil::collector::pack::Scope::Database => "app",
    };
    let mut state = CollectorState::default();
    let t0 = Instant::now();
    let mut families = Vec::new();
    for (i, rows) in recorded_polls(&def.name.0).iter().enumerate() {
        let ctx = Context {
            def,
            base_labels: &base,
            database,
            now: t0 + INTERVAL * i as u32,
            statements: pgvigil::config::StatementsConfig {
                top_n: 3,
                ..Default::default()
            },
            tables: pgvigil::config::TablesConfig { top_n: 3 },
            names: Some(names),
            monitored: &|_| true,
        };
        families = state
            .families(def, INTERVAL, rows, &ctx)
            .unwrap_or_else(|e| panic!("{}: poll {i}: {}", def.name, e.message));
    }
    Snapshot { families }
}

fn builtin() -> Catalog {
    Catalog::load(&Default::default()).expect("built-in packs load")
}

#[test]
fn every_built_in_pack_exports_exactly_its_golden_text() {
    let catalog = builtin();
    let names = recorded_names(&catalog);
    let update = std::env::var_os("PGVIGIL_UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for (file, _) in BUILTIN_PACKS {
        let snapshots: Vec<Arc<Snapshot>> = catalog
            .collectors
            .iter()
            .filter(|c| c.source == Path::new(file))
            .map(|c| Arc::new(replay(c, &names)))
            .collect();
        assert!(!snapshots.is_empty(), "{file}: no collectors");
        let text = exposition::encode(snapshots, Vec::new(), Format::Text);
        let stem = Path::new(file)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let golden = golden_dir().join(format!("{stem}.prom"));
        if update {
            std::fs::write(&golden, &text).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (PGVIGIL_UPDATE_GOLDEN=1 writes it)",
                golden.display()
            )
        });
        if text != want {
            let diff: Vec<String> = diff_lines(&want, &text);
            failures.push(format!(
                "{file}: exposition differs from {} (PGVIGIL_UPDATE_GOLDEN=1 rewrites it):\n{}",
                golden.display(),
                diff.join("\n")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Every metric a built-in pack declares appears in its golden file with at least one
/// sample, so the recordings exercise the whole pack (a metric no row feeds would pass the
/// exact comparison above while testing nothing).
#[test]
fn the_recordings_feed_every_declared_metric() {
    let catalog = builtin();
    let mut missing = Vec::new();
    for c in &catalog.collectors {
        let stem = c.source.file_stem().unwrap().to_string_lossy().to_string();
        let golden =
            std::fs::read_to_string(golden_dir().join(format!("{stem}.prom"))).unwrap_or_default();
        for m in &c.metrics.0 {
            let has_sample = match &m.name_rule {
                // A name_from rule: some sample whose name it made (not a declared name).
                Some(rule) => golden.lines().any(|l| {
                    let name = l.split(['{', ' ']).next().unwrap_or("");
                    !l.starts_with('#')
                        && name.starts_with(&rule.prefix)
                        && !c.metrics.0.iter().any(|d| d.name.0 == name)
                }),
                None => golden.lines().any(|l| {
                    l.starts_with(m.name.0.as_str()) && l[m.name.0.len()..].starts_with(['{', ' '])
                }),
            };
            if !has_sample {
                missing.push(format!("{} ({})", m.name, c.name));
            }
        }
    }
    // Metrics that need what a short recording on one server cannot show.
    let allowed = [
        // Only with pg_stat_statements.track_planning = on.
        "pg_stat_statements_plan_seconds_total",
        // NULL until pg_stat_reset() is called once on the database.
        "pg_stat_database_stats_reset_timestamp_seconds",
        // pg_stat_checkpointer.num_done exists from PostgreSQL 18; the recording runs on
        // the local server (15). tests/versions.rs checks it on 18.
        "pg_checkpoints_done_total",
    ];
    missing.retain(|m| !allowed.iter().any(|a| m.starts_with(a)));
    assert!(
        missing.is_empty(),
        "no sample in the golden files for: {missing:?}"
    );
}

/// Lines only in `want` (-) or only in `got` (+), in order.
fn diff_lines(want: &str, got: &str) -> Vec<String> {
    let w: std::collections::HashSet<&str> = want.lines().collect();
    let g: std::collections::HashSet<&str> = got.lines().collect();
    let mut out: Vec<String> = want
        .lines()
        .filter(|l| !g.contains(l))
        .map(|l| format!("- {l}"))
        .collect();
    out.extend(
        got.lines()
            .filter(|l| !w.contains(l))
            .map(|l| format!("+ {l}")),
    );
    out
}

// ---- recording -------------------------------------------------------------------------

/// A row as YAML: numbers where the column decodes as one, text otherwise.
fn to_yaml(row: &tokio_postgres::Row) -> Value {
    let mut map = serde_yaml_ng::Mapping::new();
    for (i, col) in row.columns().iter().enumerate() {
        use tokio_postgres::types::Type;
        let text = [Type::TEXT, Type::VARCHAR, Type::NAME, Type::BPCHAR].contains(col.type_());
        let v = if text {
            match row.try_get::<_, Option<String>>(i) {
                Ok(Some(s)) => Value::String(s),
                _ => Value::Null,
            }
        } else {
            match row.try_get::<_, SqlNumber>(i) {
                Ok(SqlNumber(Some(n))) => Value::from(n),
                Ok(SqlNumber(None)) => Value::Null,
                Err(_) => Value::String(
                    row.try_get::<_, SqlLabel>(i)
                        .map(|l| l.0)
                        .unwrap_or_default(),
                ),
            }
        };
        map.insert(Value::String(col.name().to_string()), v);
    }
    Value::Mapping(map)
}

#[test]
#[ignore = "records tests/golden/rows from a throwaway PostgreSQL; run on purpose"]
fn record_rows() {
    use common::*;
    let pg = cluster(&[
        ("shared_preload_libraries", "pg_stat_statements"),
        // WAL archiving that worked once and fails now; a prepared transaction; a slot
        // whose safe_wal_size is known.
        ("archive_mode", "on"),
        ("archive_command", "true"),
        ("max_prepared_transactions", "2"),
        ("max_slot_wal_keep_size", "1GB"),
        // Autovacuum soon enough to see it in pg_table_last_auto*_timestamp_seconds.
        ("autovacuum_naptime", "1"),
    ]);
    let app = Session::connect(&pg.dsn());
    archiving_that_fails(&pg);
    pg.psql(
        "postgres",
        "CREATE TABLE prepared_here (id int);
         BEGIN; INSERT INTO prepared_here VALUES (1); PREPARE TRANSACTION 'golden';
         SELECT pg_create_physical_replication_slot('golden_slot', true);
         ALTER SYSTEM SET max_connections = 101; SELECT pg_reload_conf();",
    )
    .unwrap();
    app.run(
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
         CREATE TABLE orders (id int PRIMARY KEY, customer text, total numeric);
         INSERT INTO orders SELECT g, 'c' || (g % 7), g * 1.5 FROM generate_series(1, 2000) g;
         -- A failed concurrent build leaves an invalid index behind.
         INSERT INTO orders VALUES (2001, 'c1', 1);",
    );
    let _ =
        app.try_run("CREATE UNIQUE INDEX CONCURRENTLY orders_customer_key ON orders (customer)");
    // The largest table (so it has per-table series with top_n 3), vacuumed and analyzed
    // by autovacuum, with an index nothing scans.
    app.run(
        "CREATE TABLE events (id int, kind text) WITH (
           autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0,
           autovacuum_analyze_threshold = 0, autovacuum_analyze_scale_factor = 0);
         CREATE INDEX events_kind ON events (kind);
         INSERT INTO events SELECT g, 'kind ' || (g % 3) FROM generate_series(1, 50000) g;
         DELETE FROM events WHERE id <= 100;",
    );
    wait_until(Duration::from_secs(60), "events autovacuumed", || {
        pg.psql(
            "postgres",
            "SELECT last_autovacuum IS NOT NULL AND last_autoanalyze IS NOT NULL
             FROM pg_stat_all_tables WHERE relname = 'events'",
        )
        .unwrap()
            == "t"
    });
    app.run("SELECT pg_stat_statements_reset()");
    let workload = |n: usize| {
        for i in 0..n {
            app.run(&format!(
                "SELECT count(*) FROM orders WHERE customer = 'c{}'",
                i % 7
            ));
            app.run(&format!(
                "UPDATE orders SET total = total + 1 WHERE id = {}",
                i + 10
            ));
            app.run("SELECT pg_sleep(0.01)");
        }
        for i in 0..3 {
            app.run(&format!("SELECT {i} AS rare_{i}"));
        }
    };
    // A lock pile-up on one row: one session holds it, two wait behind it (a row lock,
    // so the collectors' own queries, e.g. relation sizes, are not blocked).
    let holder = Session::connect(&pg.dsn());
    holder.run("BEGIN; UPDATE orders SET total = 0 WHERE id = 1");
    let waiter = Session::connect(&pg.dsn());
    let waiting = waiter.start("UPDATE orders SET total = 1 WHERE id = 1");
    let second = Session::connect(&pg.dsn());
    let waiting2 = second.start("UPDATE orders SET total = 2 WHERE id = 1");
    wait_until(Duration::from_secs(10), "two lock waits", || {
        waits_for_lock(&pg, waiter.pid) && waits_for_lock(&pg, second.pid)
    });

    // Security posture: a password that expires, a policy that protects nothing, RLS the
    // owner bypasses, and a pg_hba.conf line the server cannot parse (not reloaded).
    pg.psql(
        "postgres",
        "CREATE ROLE golden_app LOGIN PASSWORD 'x' VALID UNTIL '2030-01-01 00:00:00+00';
         CREATE TABLE tenants (id int, owner text);
         CREATE POLICY tenant_rows ON tenants USING (owner = current_user);
         CREATE TABLE accounts (id int);
         ALTER TABLE accounts ENABLE ROW LEVEL SECURITY;",
    )
    .unwrap();
    let hba = pg.data_dir().join("pg_hba.conf");
    let mut text = std::fs::read_to_string(&hba).unwrap();
    text.push_str("host all all 127.0.0.1/32 no_such_method\n");
    std::fs::write(&hba, text).unwrap();

    let catalog = builtin();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&pg.dsn(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    });
    let version: u32 = rt
        .block_on(client.query_one("SELECT current_setting('server_version_num')::int", &[]))
        .unwrap()
        .get::<_, i32>(0) as u32;
    std::fs::create_dir_all(golden_dir().join("rows")).unwrap();
    // Two polls with work in between, so the window statistics have something to show.
    let mut polls: Vec<Vec<(String, Vec<Value>)>> = Vec::new();
    for round in 0..2 {
        workload(20 + 10 * round);
        let mut this = Vec::new();
        for c in &catalog.collectors {
            if HAND_WRITTEN.contains(&c.name.0.as_str()) || c.kind != TargetKind::Postgres {
                continue;
            }
            let sql = &c.queries.resolve(version).expect("a variant").sql;
            let rows = rt
                .block_on(client.query(sql.as_str(), &[]))
                .unwrap_or_else(|e| panic!("{}: {e}", c.name));
            this.push((c.name.0.clone(), rows.iter().map(to_yaml).collect()));
        }
        polls.push(this);
    }
    drop(holder);
    pg.psql("postgres", "COMMIT PREPARED 'golden'").unwrap();
    let _ = waiting.wait(Duration::from_secs(10));
    let _ = waiting2.wait(Duration::from_secs(10));
    // PGVIGIL_RECORD_ONLY=a,b records the rows of those collectors only (a new pack),
    // leaving every other recording as it is.
    let only: Option<Vec<String>> = std::env::var("PGVIGIL_RECORD_ONLY")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    for (i, (name, _)) in polls[0].iter().enumerate() {
        if only.as_ref().is_some_and(|o| !o.contains(name)) {
            continue;
        }
        let doc = serde_yaml_ng::to_string(&serde_yaml_ng::Mapping::from_iter([(
            Value::from("polls"),
            Value::Sequence(
                polls
                    .iter()
                    .map(|p| Value::Sequence(p[i].1.clone()))
                    .collect(),
            ),
        )]))
        .unwrap();
        let header = format!(
            "# Rows of the `{name}` collector, recorded from PostgreSQL {version} by\n# `cargo nextest run --test golden --run-ignored only` (tests/golden.rs).\n"
        );
        std::fs::write(rows_path(name), header + &doc).unwrap();
    }
}

/// PgBouncer's console answers in text: a value that reads as an integer or a number is
/// recorded as one (as the pack's metrics read it), anything else as text.
fn text_to_yaml(text: Option<&str>) -> Value {
    match text {
        None => Value::Null,
        Some(t) => match (t.parse::<i64>(), t.parse::<f64>()) {
            (Ok(i), _) => Value::from(i),
            (_, Ok(f)) => Value::from(f),
            _ => Value::String(t.to_string()),
        },
    }
}

#[test]
#[ignore = "records tests/golden/rows of the PgBouncer pack from a throwaway PgBouncer; run on purpose"]
fn record_pgbouncer_rows() {
    use pgvigil::demo::cluster::{PgBouncerOptions, TempPgBouncer};
    use tokio_postgres::SimpleQueryMessage;
    let pg = common::cluster(&[]);
    let bouncer = TempPgBouncer::start(&pg, &PgBouncerOptions::default()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let connect = |user: &str, password: &str, db: &str| {
        let dsn = bouncer.dsn_for(user, password, db);
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client
        })
    };
    // Three clients in transactions on a pool of 2: one waits.
    let clients: Vec<_> = (0..3)
        .map(|_| connect("app", "app-secret", "postgres"))
        .collect();
    for c in &clients[..2] {
        rt.block_on(c.simple_query("BEGIN; SELECT 1")).unwrap();
    }
    let waiting = {
        let c = &clients[2];
        rt.block_on(async {
            let f = c.simple_query("BEGIN");
            tokio::time::timeout(Duration::from_millis(1500), f)
                .await
                .is_err()
        })
    };
    assert!(waiting, "the third client waits for the pool");
    let console = connect("pgvigil", "pgvigil-secret", "pgbouncer");
    let catalog = builtin();
    let version = rt
        .block_on(console.simple_query("SHOW VERSION"))
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default();
    for c in catalog
        .collectors
        .iter()
        .filter(|c| c.kind == TargetKind::Pgbouncer)
    {
        let rows: Vec<Value> = rt
            .block_on(console.simple_query(&c.queries.0[0].sql))
            .unwrap_or_else(|e| panic!("{}: {e}", c.name))
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(Value::Mapping(
                    r.columns()
                        .iter()
                        .enumerate()
                        .map(|(i, col)| (Value::from(col.name()), text_to_yaml(r.get(i))))
                        .collect(),
                )),
                _ => None,
            })
            .collect();
        let doc = serde_yaml_ng::to_string(&serde_yaml_ng::Mapping::from_iter([(
            Value::from("polls"),
            Value::Sequence(vec![Value::Sequence(rows)]),
        )]))
        .unwrap();
        let header = format!(
            "# Rows of the `{}` collector, recorded from {version} by\n# `cargo nextest run --test golden --run-ignored only` (tests/golden.rs).\n",
            c.name
        );
        std::fs::write(rows_path(&c.name.0), header + &doc).unwrap();
    }
}

/// Archives one WAL file with a command that works, then switches to one that fails and
/// waits for the failure, so every archiver metric has a value.
fn archiving_that_fails(pg: &common::TempCluster) {
    let count = |column: &str| -> i64 {
        pg.psql(
            "postgres",
            &format!("SELECT {column} FROM pg_stat_archiver"),
        )
        .unwrap()
        .parse()
        .unwrap()
    };
    let switch = "CREATE TABLE IF NOT EXISTS wal_filler (n int);
                  INSERT INTO wal_filler VALUES (1); SELECT pg_switch_wal();";
    pg.psql("postgres", switch).unwrap();
    common::wait_until(Duration::from_secs(30), "a WAL file archived", || {
        count("archived_count") > 0
    });
    pg.psql(
        "postgres",
        "ALTER SYSTEM SET archive_command = 'false'; SELECT pg_reload_conf();",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    pg.psql("postgres", switch).unwrap();
    common::wait_until(Duration::from_secs(30), "archiving to fail", || {
        count("failed_count") > 0
    });
}
