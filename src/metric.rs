//! The metric model every stage passes on: packs declare [`MetricType`]s, collectors
//! build [`Family`]s of [`Sample`]s, the store keeps them and the exposition encodes them.
//! It depends on nothing else in the crate.

use std::sync::Arc;

use serde::Deserialize;

/// The Prometheus type of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricType {
    Gauge,
    Counter,
    /// Value is always 1; the labels carry the information.
    Info,
}

/// One sample: its labels (target labels first) and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: Vec<(Arc<str>, String)>,
    pub value: f64,
}

/// A metric family as read in one poll.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: Arc<str>,
    pub help: Arc<str>,
    pub kind: MetricType,
    pub samples: Vec<Sample>,
}

impl MetricType {
    /// The name used in packs.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricType::Gauge => "gauge",
            MetricType::Counter => "counter",
            MetricType::Info => "info",
        }
    }
}

/// Everything one collector produced in one poll of one database.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub families: Vec<Family>,
}
