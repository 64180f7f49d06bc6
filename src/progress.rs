//! pg_stat_progress_create_index post-processing: progress ratio and ETA across polls.
//! (Placeholder until the index-build work lands: passes families through.)

use tokio_postgres::Row;

use crate::collector::processor::{Context, Processor};
use crate::postgres::PgError;
use crate::store::Family;

/// Metric names this processor adds.
pub const EXTRA_METRICS: &[&str] = &[];

/// Keeps per-build progress history.
#[derive(Default)]
pub struct ProgressProcessor {}

impl Processor for ProgressProcessor {
    fn process(
        &mut self,
        _rows: &[Row],
        families: Vec<Family>,
        _ctx: &Context,
    ) -> Result<Vec<Family>, PgError> {
        Ok(families)
    }
}
