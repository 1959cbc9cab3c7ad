//! What PostgreSQL did for a phase, from `pg_stat_database` of the run's database: the
//! counters before and after, so a scenario can say what one answered message cost.
use sqlx::PgPool;

/// Cumulative counters of the database at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct DbCounters {
    transactions: i64,
    /// Rows read by sequential scans and index entries returned by index scans.
    returned: i64,
    /// Rows fetched by index scans.
    fetched: i64,
    written: i64,
}

/// Per unit of work (one answered message) between two snapshots.
#[derive(Debug, Clone, Copy, Default)]
pub struct DbCost {
    pub transactions: f64,
    pub rows_returned: f64,
    pub rows_fetched: f64,
    pub rows_written: f64,
}

impl DbCounters {
    /// The database's counters now, the bench's own statements included ([`publish_own`]).
    /// A busy backend publishes its counters at the end of a transaction at most once a second,
    /// so a phase of several seconds is measured to within a second's of the stack's work.
    pub async fn read(db: &PgPool) -> anyhow::Result<DbCounters> {
        publish_own(db).await?;
        let mut conn = db.acquire().await?;
        sqlx::query("select pg_stat_clear_snapshot()")
            .execute(&mut *conn)
            .await?;
        let row: (i64, i64, i64, i64) = sqlx::query_as(
            "select xact_commit + xact_rollback, tup_returned, tup_fetched,
                    tup_inserted + tup_updated + tup_deleted
             from pg_stat_database where datname = current_database()",
        )
        .fetch_one(&mut *conn)
        .await?;
        Ok(DbCounters {
            transactions: row.0,
            returned: row.1,
            fetched: row.2,
            written: row.3,
        })
    }

    /// What happened since `self`, per one of `units`.
    pub fn per(&self, after: &DbCounters, units: usize) -> DbCost {
        let n = units.max(1) as f64;
        DbCost {
            transactions: (after.transactions - self.transactions) as f64 / n,
            rows_returned: (after.returned - self.returned) as f64 / n,
            rows_fetched: (after.fetched - self.fetched) as f64 / n,
            rows_written: (after.written - self.written) as f64 / n,
        }
    }
}

/// Makes every idle connection of the bench's pool publish the counters it holds back.
///
/// A backend that goes idle within a second of its last publication holds its counters for
/// ten seconds (PostgreSQL's `PGSTAT_IDLE_INTERVAL`). The bench's statements just before a
/// phase (counting and deleting the previous scenario's backlog, ~300,000 index entries;
/// seeding the phase's accounts) then landed in the middle of the phase and were counted as
/// the stack's: the first pipeline phase read 29–41 rows per answered message in about one
/// run of four instead of ~19. `pg_stat_force_next_flush()` (PostgreSQL 15) makes a backend
/// publish when the statement ends, before it answers; each connection is held while the
/// others are asked, so each is asked once.
async fn publish_own(db: &PgPool) -> anyhow::Result<()> {
    let idle = db.num_idle();
    let mut held = Vec::with_capacity(idle);
    for _ in 0..idle {
        held.push(db.acquire().await?);
    }
    for conn in &mut held {
        sqlx::query("select pg_stat_force_next_flush()")
            .execute(&mut **conn)
            .await?;
    }
    Ok(())
}
