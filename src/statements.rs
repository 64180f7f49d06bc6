//! pg_stat_statements post-processing (placeholder).

use tokio_postgres::Row;

use crate::collector::processor::{Context, Processor};
use crate::postgres::PgError;
use crate::store::Family;

/// Metric names this processor adds.
pub const EXTRA_METRICS: &[&str] = &[];

#[derive(Default)]
pub struct StatementsProcessor {}

impl Processor for StatementsProcessor {
    fn process(
        &mut self,
        _rows: &[Row],
        families: Vec<Family>,
        _ctx: &Context,
    ) -> Result<Vec<Family>, PgError> {
        Ok(families)
    }
}
